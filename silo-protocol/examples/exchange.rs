//! Two peers over real loopback TCP, using only `silo-protocol`: the source
//! sends a device info, a few blocks (compressed where it pays), a dirty list
//! and a custom "authority transfer" event; the destination applies the
//! writes to an in-memory image and acknowledges everything.
//!
//! Run with `cargo run -p silo-protocol --example exchange`.
#![allow(clippy::print_stdout)]

use bytes::Bytes;
use silo_protocol::transport::{Config, Connection, Priority};
use silo_protocol::{BlockList, Compression, DeviceInfo, Event, Kind, Message};
use tokio::net::{TcpListener, TcpStream};

const DEVICE: u32 = 1;
const SIZE: usize = 64 * 1024;
const BLOCK: usize = 4096;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;

    // Destination: accept, handshake, serve device 1 and the control channel.
    let destination = tokio::spawn(async move {
        let (stream, _) = listener.accept().await?;
        stream.set_nodelay(true)?;
        let (r, w) = stream.into_split();
        let conn = Connection::from_split(r, w, Config::default()).await?;
        let mut infos = conn.incoming(DEVICE, Kind::DeviceInfo)?;
        let mut writes = conn.incoming(DEVICE, Kind::WriteAt)?;
        let mut dirty = conn.incoming(DEVICE, Kind::DirtyList)?;
        let mut events = conn.incoming(0, Kind::Event)?;

        let info = infos.recv().await?;
        let Message::DeviceInfo(info) = &info.message else {
            unreachable!("routed by kind")
        };
        println!("destination: device {:?} of {} bytes", info.name, info.size);
        let mut image = vec![0u8; info.size as usize];
        loop {
            tokio::select! {
                req = writes.recv() => {
                    let req = req?;
                    let Message::WriteAt(w) = &req.message else { unreachable!() };
                    let data = w.data()?; // bounded by the declared length
                    let at = w.offset as usize;
                    image[at..at + data.len()].copy_from_slice(&data);
                    let length = w.length;
                    println!("destination: {} bytes at {} ({} on the wire, {})",
                        length, w.offset, w.payload.len(), w.encoding.name());
                    req.respond(Message::WriteAtOk { length }).await?;
                }
                req = dirty.recv() => {
                    let req = req?;
                    println!("destination: dirty list {:?}", req.message);
                    req.respond(Message::Ack).await?;
                }
                req = events.recv() => {
                    let req = req?;
                    if let Message::Event(e) = &req.message {
                        println!("destination: event {:?} with {:?}", e.kind, e.payload);
                    }
                    req.respond(Message::Ack).await?;
                    break;
                }
            }
        }
        println!("destination: metrics {:?}", conn.metrics().total());
        Ok::<_, Box<dyn std::error::Error + Send + Sync>>(image)
    });

    // Source.
    let stream = TcpStream::connect(addr).await?;
    stream.set_nodelay(true)?;
    let (r, w) = stream.into_split();
    let conn = Connection::from_split(r, w, Config::default()).await?;
    println!("source: negotiated {:?}", conn.negotiated());
    conn.notify(
        DEVICE,
        Message::DeviceInfo(DeviceInfo {
            size: SIZE as u64,
            block_size: BLOCK as u32,
            name: "disk0".into(),
            schema: String::new(),
        }),
        Priority::Urgent,
    )
    .await?;
    let text: Vec<u8> = b"silo moves block devices while they are in use. "
        .iter()
        .copied()
        .cycle()
        .take(BLOCK)
        .collect();
    let blocks = [
        Bytes::from(text),
        Bytes::from(vec![0u8; BLOCK]),
        Bytes::from(
            (0..BLOCK)
                .map(|i| (i * 7919 % 251) as u8)
                .collect::<Vec<_>>(),
        ),
    ];
    for (i, b) in blocks.iter().enumerate() {
        conn.write_at(
            DEVICE,
            (i * BLOCK) as u64,
            b,
            Compression::Lz4,
            Priority::Bulk,
        )
        .await?;
    }
    conn.request_ack(
        DEVICE,
        Message::DirtyList(BlockList {
            block_size: BLOCK as u32,
            blocks: vec![0],
        }),
    )
    .await?;
    conn.write_at(DEVICE, 0, &blocks[0], Compression::Lz4, Priority::Bulk)
        .await?;
    conn.request_ack(
        0,
        Message::Event(Event::custom(
            0,
            Bytes::from_static(b"resume on destination"),
        )),
    )
    .await?;
    // The event was acknowledged only after the destination handled it.
    let image = destination.await?.map_err(|e| e.to_string())?;
    for (i, b) in blocks.iter().enumerate() {
        assert_eq!(&image[i * BLOCK..(i + 1) * BLOCK], &b[..]);
    }
    println!(
        "source: destination image matches; metrics {:?}",
        conn.metrics().total()
    );
    conn.close();
    Ok(())
}
