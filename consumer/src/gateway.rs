//! The one way out of the sandbox that resolves a job's dependencies: a Unix socket of the
//! job's own, bound into that step's sandbox, where cargo finds its registry endpoint.
//!
//! The sandbox has no network (its network namespace holds only a loopback interface), so
//! cargo is given `http.proxy = socks5h://localhost/<socket>`: libcurl speaks SOCKS5 over a
//! Unix socket, and hands the proxy the host name unresolved. The gateway answers the SOCKS
//! handshake, lets through only [`REGISTRY_HOST`] port 80, and serves the registry endpoint
//! (`mirror.rs`) on that very connection. Any other target is refused and remembered, so the
//! job's log and result say what cargo was steered to reach.
//!
//! One gateway per resolution: it is opened for the job's `cargo fetch` and closed (its socket
//! removed) as soon as that step ends, so nothing the package runs later can reach it.

use std::net::{Ipv4Addr, Ipv6Addr};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{UnixListener, UnixStream};

/// The registry's name as cargo is given it; it resolves nowhere but here.
pub const REGISTRY_HOST: &str = "registry.quarry.invalid";
const REGISTRY_PORT: u16 = 80;

/// Longest path a Unix socket can be bound at (`sun_path`, less its terminating NUL).
pub const MAX_SOCKET_PATH: usize = 107;

/// How long a client has to finish the SOCKS handshake.
const HANDSHAKE_TIME: Duration = Duration::from_secs(10);

/// A job's gateway, serving until dropped.
pub struct Gateway {
    socket: PathBuf,
    /// Targets other than the registry that a client asked for, in order, each once.
    refused: Arc<Mutex<Vec<String>>>,
    accept: tokio::task::JoinHandle<()>,
    serve: tokio::task::JoinHandle<()>,
}

impl Gateway {
    /// Opens a gateway at `socket` (a path on this host, at most [`MAX_SOCKET_PATH`] bytes)
    /// serving `endpoint`.
    pub fn open(socket: &Path, endpoint: Router) -> std::io::Result<Gateway> {
        // A consumer that died may have left it.
        let _ = std::fs::remove_file(socket);
        let listener = UnixListener::bind(socket)?;
        let refused: Arc<Mutex<Vec<String>>> = Arc::default();
        let (admitted, connections) = tokio::sync::mpsc::channel(16);
        let accept = tokio::spawn({
            let refused = refused.clone();
            async move {
                loop {
                    let Ok((stream, _)) = listener.accept().await else {
                        // Out of file descriptors, say: let connections end before the next.
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    };
                    let admitted = admitted.clone();
                    let refused = refused.clone();
                    tokio::spawn(async move {
                        let mut stream = stream;
                        let asked =
                            tokio::time::timeout(HANDSHAKE_TIME, handshake(&mut stream)).await;
                        let Ok(Ok(asked)) = asked else {
                            return;
                        };
                        // Remembered before the client hears it was refused.
                        if let Admission::Refused { target, .. } = &asked {
                            let mut refused = refused.lock().unwrap_or_else(|p| p.into_inner());
                            if !refused.contains(target) {
                                refused.push(target.clone());
                            }
                        }
                        let status = match &asked {
                            Admission::Registry => 0,
                            Admission::Refused { status, .. } => *status,
                        };
                        if stream.write_all(&reply(status)).await.is_ok()
                            && matches!(asked, Admission::Registry)
                        {
                            let _ = admitted.send(stream).await;
                        }
                    });
                }
            }
        });
        let serve = tokio::spawn(async move {
            if let Err(err) = axum::serve(Admitted(connections), endpoint).await {
                tracing::warn!(%err, "a job's registry gateway stopped");
            }
        });
        Ok(Gateway {
            socket: socket.to_owned(),
            refused,
            accept,
            serve,
        })
    }

    /// Where the gateway listens, on this host.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// The targets other than the registry that clients asked for so far (`host:port`).
    pub fn refused(&self) -> Vec<String> {
        self.refused
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        self.accept.abort();
        self.serve.abort();
        let _ = std::fs::remove_file(&self.socket);
    }
}

/// The connections that passed the handshake, as a listener for `axum::serve`.
struct Admitted(tokio::sync::mpsc::Receiver<UnixStream>);

impl axum::serve::Listener for Admitted {
    type Io = UnixStream;
    type Addr = ();

    async fn accept(&mut self) -> (UnixStream, ()) {
        match self.0.recv().await {
            Some(stream) => (stream, ()),
            // The accepting task is gone: the gateway is closing.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> std::io::Result<()> {
        Ok(())
    }
}

enum Admission {
    Registry,
    /// What it asked to reach instead, and the SOCKS status to answer.
    Refused {
        target: String,
        status: u8,
    },
}

/// SOCKS5 (RFC 1928), no authentication, CONNECT only, up to the request: admits a connection
/// to the registry, refuses (and names) any other target. The caller sends the reply.
async fn handshake(stream: &mut UnixStream) -> std::io::Result<Admission> {
    let invalid =
        |what: &str| std::io::Error::new(std::io::ErrorKind::InvalidData, what.to_owned());
    let mut greeting = [0u8; 2];
    stream.read_exact(&mut greeting).await?;
    if greeting[0] != 5 {
        return Err(invalid("not SOCKS5"));
    }
    let mut methods = vec![0u8; usize::from(greeting[1])];
    stream.read_exact(&mut methods).await?;
    if !methods.contains(&0) {
        stream.write_all(&[5, 0xff]).await?;
        return Err(invalid("no acceptable authentication method"));
    }
    stream.write_all(&[5, 0]).await?;
    let mut request = [0u8; 4];
    stream.read_exact(&mut request).await?;
    let host = match request[3] {
        1 => {
            let mut address = [0u8; 4];
            stream.read_exact(&mut address).await?;
            Ipv4Addr::from(address).to_string()
        }
        3 => {
            let mut length = [0u8; 1];
            stream.read_exact(&mut length).await?;
            let mut name = vec![0u8; usize::from(length[0])];
            stream.read_exact(&mut name).await?;
            String::from_utf8_lossy(&name).into_owned()
        }
        4 => {
            let mut address = [0u8; 16];
            stream.read_exact(&mut address).await?;
            format!("[{}]", Ipv6Addr::from(address))
        }
        _ => {
            stream.write_all(&reply(8)).await?;
            return Err(invalid("unknown address type"));
        }
    };
    let mut port = [0u8; 2];
    stream.read_exact(&mut port).await?;
    let port = u16::from_be_bytes(port);
    let target = format!("{host}:{port}");
    if request[0] != 5 || request[1] != 1 {
        // "Command not supported".
        return Ok(Admission::Refused { target, status: 7 });
    }
    if !host.eq_ignore_ascii_case(REGISTRY_HOST) || port != REGISTRY_PORT {
        // "Connection not allowed by ruleset".
        return Ok(Admission::Refused { target, status: 2 });
    }
    Ok(Admission::Registry)
}

/// A SOCKS5 reply with status `code` (no bound address worth telling).
fn reply(code: u8) -> [u8; 10] {
    [5, code, 0, 1, 0, 0, 0, 0, 0, 0]
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn connect(gateway: &Gateway, host: &str, port: u16) -> (UnixStream, u8) {
        let mut stream = UnixStream::connect(gateway.socket()).await.unwrap();
        stream.write_all(&[5, 1, 0]).await.unwrap();
        let mut chosen = [0u8; 2];
        stream.read_exact(&mut chosen).await.unwrap();
        assert_eq!(chosen, [5, 0]);
        let mut request = vec![5, 1, 0, 3, host.len() as u8];
        request.extend(host.as_bytes());
        request.extend(port.to_be_bytes());
        stream.write_all(&request).await.unwrap();
        let mut answer = [0u8; 10];
        stream.read_exact(&mut answer).await.unwrap();
        (stream, answer[1])
    }

    #[tokio::test]
    async fn only_the_registry_gets_through_and_the_rest_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let endpoint = Router::new().route("/hello", axum::routing::get(|| async { "registry" }));
        let gateway = Gateway::open(&dir.path().join("g.sock"), endpoint).unwrap();

        let (mut stream, status) = connect(&gateway, REGISTRY_HOST, 80).await;
        assert_eq!(status, 0);
        stream
            .write_all(b"GET /hello HTTP/1.1\r\nHost: registry.quarry.invalid\r\nConnection: close\r\n\r\n")
            .await
            .unwrap();
        let mut response = String::new();
        stream.read_to_string(&mut response).await.unwrap();
        assert!(response.starts_with("HTTP/1.1 200"), "{response}");
        assert!(response.ends_with("registry"), "{response}");

        for (host, port) in [("evil.example", 443), (REGISTRY_HOST, 8080)] {
            let (_, status) = connect(&gateway, host, port).await;
            assert_eq!(status, 2, "{host}:{port} refused");
        }
        assert_eq!(
            gateway.refused(),
            ["evil.example:443", "registry.quarry.invalid:8080"]
        );
        let socket = gateway.socket().to_owned();
        drop(gateway);
        assert!(!socket.exists(), "the socket goes with the gateway");
    }
}
