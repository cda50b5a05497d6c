//! A TCP proxy a test puts between a node and a service (Postgres, NATS), to cut the node off
//! and heal it again.

use std::net::SocketAddr;

use anyhow::Context;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinSet;

/// Forwards `127.0.0.1:<port>` to an upstream address. [`Proxy::cut`] black-holes it: nothing
/// is forwarded any more in either direction, but every socket stays open and what was sent
/// is held back — as a network partition looks to both ends (no reset, no error, just
/// silence). [`Proxy::heal`] lets it flow again, held bytes first, so writes a node made while
/// cut off arrive late. Connections made while cut are accepted and held too. Dropping the
/// proxy closes every connection.
pub struct Proxy {
    addr: SocketAddr,
    flowing: watch::Sender<bool>,
    accept: tokio::task::JoinHandle<()>,
}

impl Proxy {
    /// Listens on a free loopback port and forwards to `upstream` (`host:port`).
    pub async fn start(upstream: &str) -> anyhow::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let upstream = upstream.to_owned();
        let (flowing, _) = watch::channel(true);
        let gate = flowing.clone();
        let accept = tokio::spawn(async move {
            // Dropped with the accept task (when the proxy is): every connection closes.
            let mut connections = JoinSet::new();
            loop {
                let Ok((inbound, _)) = listener.accept().await else {
                    return;
                };
                let upstream = upstream.clone();
                let flowing = gate.subscribe();
                connections.spawn(async move {
                    let _ = forward(inbound, &upstream, flowing).await;
                });
                while connections.try_join_next().is_some() {}
            }
        });
        Ok(Self {
            addr,
            flowing,
            accept,
        })
    }

    /// Starts a proxy to the host and port of `url` (`scheme://[user@]host:port/…`) and
    /// returns it with `url` rewritten to go through it.
    pub async fn for_url(url: &str) -> anyhow::Result<(Self, String)> {
        let (before, host_port, after) = split_url(url)?;
        let proxy = Self::start(host_port).await?;
        let proxied = format!("{before}{}{after}", proxy.addr);
        Ok((proxy, proxied))
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Stops forwarding, holding every socket open and every byte back.
    pub fn cut(&self) {
        self.flowing.send_replace(false);
    }

    /// Forwards again, what was held back first.
    pub fn heal(&self) {
        self.flowing.send_replace(true);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

/// `url` split around its `host:port`.
fn split_url(url: &str) -> anyhow::Result<(&str, &str, &str)> {
    let scheme_end = url.find("://").context("the url has no scheme")? + 3;
    let authority_end = url[scheme_end..]
        .find(['/', '?'])
        .map_or(url.len(), |i| i + scheme_end);
    let host_start = url[scheme_end..authority_end]
        .rfind('@')
        .map_or(scheme_end, |i| i + scheme_end + 1);
    let host_port = &url[host_start..authority_end];
    anyhow::ensure!(
        host_port.contains(':'),
        "the url {url:?} names no port to proxy"
    );
    Ok((&url[..host_start], host_port, &url[authority_end..]))
}

async fn forward(
    inbound: TcpStream,
    upstream: &str,
    mut flowing: watch::Receiver<bool>,
) -> std::io::Result<()> {
    // A connection made while cut is held until healed.
    let _ = flowing.wait_for(|f| *f).await;
    let outbound = TcpStream::connect(upstream).await?;
    let _ = inbound.set_nodelay(true);
    let _ = outbound.set_nodelay(true);
    let (in_read, in_write) = inbound.into_split();
    let (out_read, out_write) = outbound.into_split();
    let up = pipe(in_read, out_write, flowing.clone());
    let down = pipe(out_read, in_write, flowing);
    let _ = tokio::join!(up, down);
    Ok(())
}

/// Copies `from` to `to`, holding each chunk while the proxy is cut.
async fn pipe(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    mut flowing: watch::Receiver<bool>,
) -> std::io::Result<()> {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = from.read(&mut buf).await?;
        // Even the end of the stream is held back while cut.
        if flowing.wait_for(|f| *f).await.is_err() {
            return Ok(());
        }
        if n == 0 {
            return to.shutdown().await;
        }
        to.write_all(&buf[..n]).await?;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_are_split_around_their_host_and_port() -> anyhow::Result<()> {
        assert_eq!(
            split_url("postgres://postgres@127.0.0.1:5432/db?x=1")?,
            ("postgres://postgres@", "127.0.0.1:5432", "/db?x=1")
        );
        assert_eq!(
            split_url("nats://127.0.0.1:4222")?,
            ("nats://", "127.0.0.1:4222", "")
        );
        assert!(split_url("nats://localhost").is_err());
        Ok(())
    }

    #[tokio::test]
    async fn a_cut_proxy_holds_bytes_back_until_healed() -> anyhow::Result<()> {
        let echo = TcpListener::bind("127.0.0.1:0").await?;
        let echo_addr = echo.local_addr()?;
        tokio::spawn(async move {
            while let Ok((mut socket, _)) = echo.accept().await {
                tokio::spawn(async move {
                    let (mut r, mut w) = socket.split();
                    let _ = tokio::io::copy(&mut r, &mut w).await;
                });
            }
        });
        let proxy = Proxy::start(&echo_addr.to_string()).await?;
        let mut client = TcpStream::connect(proxy.addr()).await?;
        client.write_all(b"one").await?;
        let mut got = [0u8; 3];
        client.read_exact(&mut got).await?;
        assert_eq!(&got, b"one");

        proxy.cut();
        client.write_all(b"two").await?;
        let held = tokio::time::timeout(
            std::time::Duration::from_millis(300),
            client.read_exact(&mut got),
        )
        .await;
        assert!(held.is_err(), "nothing gets through while cut");
        proxy.heal();
        tokio::time::timeout(
            std::time::Duration::from_secs(5),
            client.read_exact(&mut got),
        )
        .await??;
        assert_eq!(&got, b"two", "held bytes arrive once healed");
        Ok(())
    }
}
