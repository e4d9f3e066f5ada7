//! The dirty loop's hooks: order, `dirty_history`, stopping, custom data.

mod common;

use std::sync::{Arc, Weak};

use async_trait::async_trait;
use bytes::Bytes;
use common::*;
use parking_lot::Mutex;
use silo_devicegroup::{
    DefaultHooks, DeviceGroup, DeviceSchema, GroupOptions, MigrateDirtyHooks, System, ToProtocol,
};
use silo_storage::ProviderExt;

const BS: u64 = 4096;

#[derive(Debug, Clone, PartialEq, Eq)]
enum Call {
    Pre(Vec<usize>),
    PostGet(Vec<usize>, usize),
    PostMigrate(Vec<usize>),
    Completed(Vec<usize>),
}

/// Writes `plan[round]` blocks of the device before each round and records
/// every call; sends custom data from `post_migrate_dirty` of round 2.
struct Recorder {
    group: Weak<DeviceGroup>,
    plan: Vec<usize>,
    calls: Mutex<Vec<Vec<Call>>>,
    stop_after_get: bool,
    stop_after_migrate: bool,
}

impl Recorder {
    fn new(group: &Arc<DeviceGroup>, plan: Vec<usize>) -> Recorder {
        Recorder {
            group: Arc::downgrade(group),
            plan,
            calls: Mutex::new(vec![Vec::new(); group.len()]),
            stop_after_get: false,
            stop_after_migrate: false,
        }
    }
}

#[async_trait]
impl MigrateDirtyHooks for Recorder {
    async fn pre_get_dirty(
        &self,
        index: usize,
        _to: &ToProtocol,
        history: &[usize],
    ) -> silo_devicegroup::Result<()> {
        self.calls.lock()[index].push(Call::Pre(history.to_vec()));
        let g = self.group.upgrade().unwrap();
        let p = g.provider_at(index).unwrap();
        let n = self.plan.get(history.len()).copied().unwrap_or(0);
        for b in 0..n as u64 {
            p.write_slice(b * 3 * BS + 7, &[history.len() as u8 + 1; 100])
                .await
                .unwrap();
        }
        Ok(())
    }

    async fn post_get_dirty(
        &self,
        index: usize,
        _to: &ToProtocol,
        history: &[usize],
        blocks: &[u64],
    ) -> silo_devicegroup::Result<bool> {
        self.calls.lock()[index].push(Call::PostGet(history.to_vec(), blocks.len()));
        Ok(!self.stop_after_get)
    }

    async fn post_migrate_dirty(
        &self,
        index: usize,
        _to: &ToProtocol,
        history: &[usize],
    ) -> silo_devicegroup::Result<bool> {
        self.calls.lock()[index].push(Call::PostMigrate(history.to_vec()));
        if index == 0 && history.len() == 2 {
            let g = self.group.upgrade().unwrap();
            g.send_custom_data(Bytes::from_static(b"from a hook"))
                .await
                .unwrap();
        }
        Ok(!self.stop_after_migrate)
    }

    async fn completed(&self, index: usize, _to: &ToProtocol, history: &[usize]) {
        self.calls.lock()[index].push(Call::Completed(history.to_vec()));
    }
}

/// Every device saw exactly `want`.
fn assert_calls(hooks: &Recorder, want: Vec<Call>) {
    for calls in hooks.calls.lock().iter() {
        assert_eq!(calls, &want);
    }
}

async fn pair() -> (
    tempfile::TempDir,
    Arc<DeviceGroup>,
    Arc<DeviceGroup>,
    Arc<Mutex<Vec<(Bytes, Vec<bool>)>>>,
) {
    let dir = tempfile::tempdir().unwrap();
    let schemas = (0..2)
        .map(|i| {
            let mut s = DeviceSchema::new(format!("d{i}"), System::Memory, 64 * BS);
            s.block_size = Some(BS);
            s
        })
        .collect();
    let src = DeviceGroup::new_from_schema(schemas, GroupOptions::default())
        .await
        .unwrap();
    for (i, n) in src.names().iter().enumerate() {
        write_pattern(&src.provider(n).unwrap(), 0, 64 * BS as usize, i as u64 + 7).await;
    }
    let (a, b) = tcp_pair().await;
    let recv = spawn_receiver(b, dir.path().to_path_buf());
    src.start_migration_to(a).await.unwrap();
    let dst = recv.await.unwrap().unwrap();
    let got = Arc::new(Mutex::new(Vec::new()));
    {
        let got = got.clone();
        let weak = Arc::downgrade(&dst);
        dst.handle_custom_data(move |d| {
            let done = weak.upgrade().unwrap().completed_devices();
            got.lock().push((d, done));
        });
    }
    src.migrate_all(4, None).await.unwrap();
    (dir, src, dst, got)
}

/// Cut-over, completion, equal hashes, close.
async fn finish(src: &DeviceGroup, dst: &DeviceGroup, authority: Option<Bytes>) {
    src.cut_over(authority).await.unwrap();
    dst.wait_for_completion().await.unwrap();
    for n in src.names() {
        assert_eq!(
            sha(&src.unlocked_provider(&n).unwrap()).await,
            sha(&dst.provider(&n).unwrap()).await,
            "device {n}"
        );
    }
    src.close_all().await.unwrap();
    dst.close_all().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hooks_run_in_order_with_growing_history_and_custom_data_arrives_first() {
    let (_dir, src, dst, got) = pair().await;
    let hooks = Recorder::new(&src, vec![3, 2, 1]);
    src.migrate_dirty(&hooks).await.unwrap();
    assert_calls(
        &hooks,
        vec![
            Call::Pre(vec![]),
            Call::PostGet(vec![], 3),
            Call::PostMigrate(vec![3]),
            Call::Pre(vec![3]),
            Call::PostGet(vec![3], 2),
            Call::PostMigrate(vec![3, 2]),
            Call::Pre(vec![3, 2]),
            Call::PostGet(vec![3, 2], 1),
            Call::PostMigrate(vec![3, 2, 1]),
            Call::Pre(vec![3, 2, 1]),
            Call::PostGet(vec![3, 2, 1], 0),
            Call::Completed(vec![3, 2, 1]),
        ],
    );
    // The custom data reached the handler (which ran before the ack) while
    // no device was complete yet.
    assert_eq!(
        got.lock().as_slice(),
        &[(Bytes::from_static(b"from a hook"), vec![false, false])]
    );
    finish(&src, &dst, None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn post_get_dirty_false_stops_without_losing_blocks() {
    let (_dir, src, dst, _got) = pair().await;
    let mut hooks = Recorder::new(&src, vec![5]);
    hooks.stop_after_get = true;
    src.migrate_dirty(&hooks).await.unwrap();
    assert_calls(
        &hooks,
        vec![
            Call::Pre(vec![]),
            Call::PostGet(vec![], 5),
            Call::Completed(vec![]),
        ],
    );
    // The 5 blocks were not sent; they must still be dirty and go out now.
    let hooks = Recorder::new(&src, vec![]);
    src.migrate_dirty(&hooks).await.unwrap();
    assert_eq!(hooks.calls.lock()[0][1], Call::PostGet(vec![], 5));
    finish(&src, &dst, None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn post_migrate_dirty_false_stops_after_the_round() {
    let (_dir, src, dst, _got) = pair().await;
    let mut hooks = Recorder::new(&src, vec![4, 4, 4]);
    hooks.stop_after_migrate = true;
    src.migrate_dirty(&hooks).await.unwrap();
    assert_calls(
        &hooks,
        vec![
            Call::Pre(vec![]),
            Call::PostGet(vec![], 4),
            Call::PostMigrate(vec![4]),
            Call::Completed(vec![4]),
        ],
    );
    // Default hooks terminate on their own and the cut-over is consistent.
    src.migrate_dirty(&DefaultHooks).await.unwrap();
    finish(&src, &dst, Some(Bytes::from_static(b"x"))).await;
}

/// Calls in the wrong order fail clearly instead of hanging.
#[tokio::test]
async fn calls_out_of_order_are_refused() {
    let mut s = DeviceSchema::new("d", System::Memory, 64 * BS);
    s.block_size = Some(BS);
    let g = DeviceGroup::new_from_schema(vec![s], GroupOptions::default())
        .await
        .unwrap();
    let e = g.migrate_all(4, None).await.unwrap_err();
    assert!(e.to_string().contains("start_migration_to"), "{e}");
    assert!(g.migrate_dirty(&DefaultHooks).await.is_err());
    assert!(g.completed().await.is_err());
    assert!(g.send_custom_data(Bytes::new()).await.is_err());
    g.close_all().await.unwrap();
    g.close_all().await.unwrap();
}
