//! Property tests of the engine's hot invariants against simple models:
//! bitfield operations vs a `Vec<bool>`, and block orders (every added block
//! comes out exactly once unless removed; prioritised blocks first, earliest
//! request first; the volatility order returns a least-written block).

use std::collections::{BTreeSet, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use proptest::prelude::*;
use silo_storage::bitfield::Bitfield;
use silo_storage::order::{AnyOrder, BlockKind, BlockOrder, PriorityOrder};
use silo_storage::volatility::VolatilityMonitor;
use silo_storage::{DynProvider, MemoryStorage, ProviderExt};

#[derive(Debug, Clone)]
enum BitOp {
    Set(u64),
    Clear(u64),
    SetIfClear(u64),
    ClearIfSet(u64),
    SetRange(u64, u64),
    ClearRange(u64, u64),
    Pop,
    Take,
    ClearAll,
}

fn bit_op(len: u64) -> impl Strategy<Value = BitOp> {
    // Indices a little past the end too: they must be ignored, not panic.
    let i = 0..len + 3;
    prop_oneof![
        i.clone().prop_map(BitOp::Set),
        i.clone().prop_map(BitOp::Clear),
        i.clone().prop_map(BitOp::SetIfClear),
        i.clone().prop_map(BitOp::ClearIfSet),
        (i.clone(), i.clone()).prop_map(|(a, b)| BitOp::SetRange(a.min(b), a.max(b))),
        (i.clone(), i).prop_map(|(a, b)| BitOp::ClearRange(a.min(b), a.max(b))),
        Just(BitOp::Pop),
        Just(BitOp::Take),
        Just(BitOp::ClearAll),
    ]
}

fn check_same(bf: &Bitfield, model: &[bool]) {
    let want: Vec<u64> = (0..model.len() as u64)
        .filter(|&i| model[i as usize])
        .collect();
    assert_eq!(bf.collect(), want);
    assert_eq!(bf.count(), want.len() as u64);
    for (i, &m) in model.iter().enumerate() {
        assert_eq!(bf.test(i as u64), m, "bit {i}");
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]

    #[test]
    fn bitfield_matches_model(len in 0u64..300, ops in prop::collection::vec(bit_op(300), 0..60)) {
        let bf = Bitfield::new(len);
        let mut model = vec![false; len as usize];
        for op in ops {
            match op {
                BitOp::Set(i) => { bf.set(i); if i < len { model[i as usize] = true; } }
                BitOp::Clear(i) => { bf.clear(i); if i < len { model[i as usize] = false; } }
                BitOp::SetIfClear(i) => {
                    let want = i < len && !model[i as usize];
                    prop_assert_eq!(bf.set_if_clear(i), want);
                    if i < len { model[i as usize] = true; }
                }
                BitOp::ClearIfSet(i) => {
                    let want = i < len && model[i as usize];
                    prop_assert_eq!(bf.clear_if_set(i), want);
                    if i < len { model[i as usize] = false; }
                }
                BitOp::SetRange(a, b) => {
                    bf.set_range(a..b);
                    for i in a..b.min(len) { model[i as usize] = true; }
                }
                BitOp::ClearRange(a, b) => {
                    bf.clear_range(a..b);
                    for i in a..b.min(len) { model[i as usize] = false; }
                }
                BitOp::Pop => {
                    let want = model.iter().position(|&x| x).map(|p| p as u64);
                    prop_assert_eq!(bf.collect_first_and_clear(), want);
                    if let Some(p) = want { model[p as usize] = false; }
                }
                BitOp::Take => {
                    let taken = bf.take();
                    check_same(&taken, &model);
                    model.iter_mut().for_each(|x| *x = false);
                }
                BitOp::ClearAll => { bf.clear_all(); model.iter_mut().for_each(|x| *x = false); }
            }
            check_same(&bf, &model);
        }
        // Range queries, clone and text round trip.
        for a in (0..len + 2).step_by(7) {
            for b in (a..len + 2).step_by(5) {
                let all = (a..b).all(|i| i < len && model[i as usize]);
                let any = (a..b).any(|i| i < len && model[i as usize]);
                prop_assert_eq!(bf.all_set(a..b), all, "all_set {}..{}", a, b);
                prop_assert_eq!(bf.any_set(a..b), any, "any_set {}..{}", a, b);
                let n = (a..b.min(len)).filter(|&i| model[i as usize]).count() as u64;
                prop_assert_eq!(bf.count_range(a..b), n);
            }
            let first = (a..len).find(|&i| model[i as usize]);
            prop_assert_eq!(bf.first_set_from(a), first);
        }
        prop_assert_eq!(&bf.clone(), &bf);
        let text = bf.to_text();
        prop_assert_eq!(Bitfield::parse(&text, len).unwrap(), bf);
    }

    #[test]
    fn bitfield_parser_never_panics(text in "[0-9 \\-a\\t]{0,40}", len in 0u64..2000) {
        if let Ok(bf) = Bitfield::parse(&text, len) {
            prop_assert_eq!(bf.len(), len);
            // Whatever parsed re-encodes to something that parses the same.
            prop_assert_eq!(Bitfield::parse(&bf.to_text(), len).unwrap(), bf);
        }
    }
}

#[derive(Debug, Clone)]
enum OrderOp {
    Add(u64),
    AddAll,
    Remove(u64),
    Prioritise(u64),
    Write(u64),
    Next,
}

fn order_op(n: u64) -> impl Strategy<Value = OrderOp> {
    prop_oneof![
        (0..n).prop_map(OrderOp::Add),
        Just(OrderOp::AddAll),
        (0..n).prop_map(OrderOp::Remove),
        (0..n).prop_map(OrderOp::Prioritise),
        (0..n).prop_map(OrderOp::Write),
        Just(OrderOp::Next),
        Just(OrderOp::Next),
    ]
}

#[derive(Clone, Copy, Debug)]
enum Flavour {
    Any,
    Volatility,
    PriorityAny,
    PriorityVolatility,
}

/// Runs `ops` against an order of `flavour` and a model.
fn run_order(flavour: Flavour, n: u64, ops: &[OrderOp]) -> Result<(), TestCaseError> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let mem: DynProvider = Arc::new(MemoryStorage::new(n * 512));
    let vol = Arc::new(VolatilityMonitor::new(mem, 512, Duration::from_secs(3600)).unwrap());
    let (order, priority, volatile): (Arc<dyn BlockOrder>, bool, bool) = match flavour {
        Flavour::Any => (Arc::new(AnyOrder::new(n)), false, false),
        Flavour::Volatility => (vol.clone(), false, true),
        Flavour::PriorityAny => (
            Arc::new(PriorityOrder::new(Arc::new(AnyOrder::new(n)))),
            true,
            false,
        ),
        Flavour::PriorityVolatility => (Arc::new(PriorityOrder::new(vol.clone())), true, true),
    };
    let mut pending = BTreeSet::new();
    let mut requests: VecDeque<u64> = VecDeque::new();
    let mut writes = vec![0u32; n as usize];
    for op in ops {
        match *op {
            OrderOp::Add(b) => {
                order.add(b);
                pending.insert(b);
            }
            OrderOp::AddAll => {
                order.add_all();
                pending.extend(0..n);
            }
            OrderOp::Remove(b) => {
                prop_assert_eq!(order.remove(b), pending.remove(&b));
                requests.retain(|&r| r != b);
            }
            OrderOp::Prioritise(b) => {
                let accepted = order.prioritise(b);
                prop_assert_eq!(accepted, priority && pending.contains(&b));
                if accepted && !requests.contains(&b) {
                    requests.push_back(b);
                }
            }
            OrderOp::Write(b) => {
                rt.block_on(vol.write_slice(b * 512, &[1u8; 512])).unwrap();
                writes[b as usize] += 1;
            }
            OrderOp::Next => {
                let got = order.next();
                match got {
                    None => prop_assert!(pending.is_empty()),
                    Some(info) => {
                        prop_assert!(pending.remove(&info.block), "{:?} was not pending", info);
                        if let Some(&first) = requests.front() {
                            prop_assert_eq!(info.block, first, "earliest request first");
                            prop_assert_eq!(info.kind, BlockKind::Priority);
                            requests.pop_front();
                        } else {
                            prop_assert_eq!(info.kind, BlockKind::Standard);
                            if volatile {
                                let min = pending
                                    .iter()
                                    .map(|&p| writes[p as usize])
                                    .min()
                                    .unwrap_or(u32::MAX);
                                prop_assert!(
                                    writes[info.block as usize] <= min,
                                    "block {} has {} writes, a pending one has {}",
                                    info.block,
                                    writes[info.block as usize],
                                    min
                                );
                            } else {
                                prop_assert!(pending.iter().all(|&p| p > info.block), "ascending");
                            }
                        }
                    }
                }
            }
        }
        prop_assert_eq!(order.pending(), pending.len() as u64);
    }
    // Drain: exactly the pending blocks come out, once each.
    let mut drained = BTreeSet::new();
    while let Some(info) = order.next() {
        prop_assert!(drained.insert(info.block), "block {} twice", info.block);
    }
    prop_assert_eq!(drained, pending);
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(150))]

    #[test]
    fn any_order_invariants(ops in prop::collection::vec(order_op(70), 0..120)) {
        run_order(Flavour::Any, 70, &ops)?;
    }

    #[test]
    fn volatility_order_invariants(ops in prop::collection::vec(order_op(70), 0..120)) {
        run_order(Flavour::Volatility, 70, &ops)?;
    }

    #[test]
    fn priority_any_order_invariants(ops in prop::collection::vec(order_op(70), 0..120)) {
        run_order(Flavour::PriorityAny, 70, &ops)?;
    }

    #[test]
    fn priority_volatility_order_invariants(ops in prop::collection::vec(order_op(70), 0..120)) {
        run_order(Flavour::PriorityVolatility, 70, &ops)?;
    }
}

/// Concurrent consumers of a priority order over the volatility order, with
/// a concurrent requester: every block comes out exactly once.
#[test]
fn concurrent_next_hands_out_each_block_once() {
    let n = 20_000u64;
    let mem: DynProvider = Arc::new(MemoryStorage::new(n * 512));
    let vol = Arc::new(VolatilityMonitor::new(mem, 512, Duration::from_secs(60)).unwrap());
    let order = Arc::new(PriorityOrder::new(vol));
    order.add_all();
    let requester = {
        let o = order.clone();
        std::thread::spawn(move || {
            for b in (0..n).rev().step_by(7) {
                o.prioritise(b);
            }
        })
    };
    let consumers: Vec<_> = (0..3)
        .map(|_| {
            let o = order.clone();
            std::thread::spawn(move || {
                std::iter::from_fn(|| o.next())
                    .map(|i| i.block)
                    .collect::<Vec<_>>()
            })
        })
        .collect();
    requester.join().unwrap();
    let mut all: Vec<u64> = consumers
        .into_iter()
        .flat_map(|h| h.join().unwrap())
        .collect();
    // Requests may arrive after the consumers finished: drain the rest.
    all.extend(std::iter::from_fn(|| order.next()).map(|i| i.block));
    all.sort_unstable();
    assert_eq!(all, (0..n).collect::<Vec<_>>());
}
