//! A slow link in user space: this machine's kernel has no `netem` qdisc,
//! so the multi-host tests delay traffic with a TCP proxy run on the far
//! host (inside its namespace), which holds each chunk it reads for a
//! random delay (`delay` ± `jitter`, in each direction) before passing it
//! on, in order. Packet loss comes from nftables (`Host::lossy`).

use std::net::SocketAddr;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Accept on `listener` and pass each connection on to `upstream` with
/// the delay; runs until the process ends.
pub async fn delay_proxy(
    listener: TcpListener,
    upstream: SocketAddr,
    delay: Duration,
    jitter: Duration,
) {
    let mut seed = 0x9e37_79b9_7f4a_7c15_u64 ^ u64::from(upstream.port());
    loop {
        let Ok((client, _)) = listener.accept().await else {
            continue;
        };
        seed = seed.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
        let seed = seed;
        tokio::spawn(async move {
            let Ok(server) = TcpStream::connect(upstream).await else {
                return;
            };
            let _ = client.set_nodelay(true);
            let _ = server.set_nodelay(true);
            let (cr, cw) = client.into_split();
            let (sr, sw) = server.into_split();
            tokio::join!(
                pump(cr, sw, delay, jitter, seed),
                pump(sr, cw, delay, jitter, seed ^ 0xff)
            );
        });
    }
}

/// Copy `from` to `to`, each chunk released `delay` ± `jitter` after it
/// was read, never before the chunk ahead of it.
async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    delay: Duration,
    jitter: Duration,
    mut seed: u64,
) {
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(tokio::time::Instant, Vec<u8>)>();
    let writer = tokio::spawn(async move {
        while let Some((at, bytes)) = rx.recv().await {
            tokio::time::sleep_until(at).await;
            if to.write_all(&bytes).await.is_err() {
                return;
            }
        }
        let _ = to.shutdown().await;
    });
    let mut last = tokio::time::Instant::now();
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        // xorshift: a uniform offset in [-jitter, +jitter].
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        let span = jitter.as_micros() as u64 * 2 + 1;
        let offset = Duration::from_micros(seed % span);
        let d = (delay + offset).saturating_sub(jitter);
        let at = (tokio::time::Instant::now() + d).max(last);
        last = at;
        if tx.send((at, buf[..n].to_vec())).is_err() {
            break;
        }
    }
    drop(tx);
    let _ = writer.await;
}
