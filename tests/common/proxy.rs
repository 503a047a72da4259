//! A fault-injecting TCP proxy placed between the service and the real Prefect server.
//!
//! It reads the head of each connection's first HTTP request to tell websocket upgrades from
//! REST calls, then forwards bytes both ways. Faults switch on and off while tests run: cut
//! every connection, cut only websockets, stall websockets without closing them, refuse
//! upgrades with an HTTP status, answer REST calls with 503, and refuse every connection.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// Largest request head the proxy reads before it gives up classifying a connection.
const MAX_HEAD_BYTES: usize = 64 * 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Rest,
    Websocket,
}

#[derive(Debug, Default)]
struct Faults {
    refuse_upgrade: Option<u16>,
    rest_unavailable: bool,
}

struct Shared {
    upstream: SocketAddr,
    faults: Mutex<Faults>,
    connections: Mutex<HashMap<u64, (Kind, CancellationToken)>>,
    next_id: AtomicU64,
    websocket_stall: watch::Sender<bool>,
    websocket_upgrades: AtomicU64,
    refused_upgrades: AtomicU64,
    rest_unavailable_answers: AtomicU64,
}

/// A running proxy. Dropping it stops accepting connections and cuts the open ones.
pub struct FaultProxy {
    address: SocketAddr,
    shared: Arc<Shared>,
    /// The task accepting connections; `None` while connections are refused.
    accept_task: Mutex<Option<JoinHandle<()>>>,
}

impl FaultProxy {
    /// Starts a proxy on a free loopback port that forwards to the API at `api_url`
    /// (`http://host:port/api`).
    pub async fn start(api_url: &str) -> Self {
        let authority = api_url.trim_start_matches("http://").split('/').next().expect("API URL has a host");
        let upstream: SocketAddr = authority.parse().expect("API URL host is an IP address and port");
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind a loopback port");
        let address = listener.local_addr().expect("bound address");
        let shared = Arc::new(Shared {
            upstream,
            faults: Mutex::new(Faults::default()),
            connections: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(0),
            websocket_stall: watch::channel(false).0,
            websocket_upgrades: AtomicU64::new(0),
            refused_upgrades: AtomicU64::new(0),
            rest_unavailable_answers: AtomicU64::new(0),
        });
        let accept_task = tokio::spawn(accept_loop(listener, Arc::clone(&shared)));
        Self { address, shared, accept_task: Mutex::new(Some(accept_task)) }
    }

    /// Returns the API URL to give the service: the proxy's address with the `/api` path.
    pub fn api_url(&self) -> String {
        format!("http://{}/api", self.address)
    }

    /// Closes every open connection at once, as a network failure would.
    pub fn cut_all(&self) {
        self.cut(|_| true);
    }

    /// Closes only the open websocket connections.
    pub fn cut_websockets(&self) {
        self.cut(|kind| kind == Kind::Websocket);
    }

    /// Stops or resumes forwarding on websocket connections, old and new, without closing them.
    pub fn stall_websockets(&self, stalled: bool) {
        self.shared.websocket_stall.send_replace(stalled);
    }

    /// Responds to websocket upgrades with `status` (such as 403 or 404) instead of forwarding
    /// them, or forwards them again when `None`.
    pub fn refuse_upgrades(&self, status: Option<u16>) {
        self.shared.faults.lock().expect("fault lock").refuse_upgrade = status;
    }

    /// Responds to REST calls with 503 while `unavailable` is true. Open REST connections are
    /// cut when it turns on, so pooled keep-alive connections cannot bypass it.
    pub fn answer_rest_with_503(&self, unavailable: bool) {
        self.shared.faults.lock().expect("fault lock").rest_unavailable = unavailable;
        if unavailable {
            self.cut(|kind| kind == Kind::Rest);
        }
    }

    /// Stops listening, so connections are refused as if the server were down, and cuts the
    /// open ones. Listening starts again on the same port when `refused` is false.
    pub async fn refuse_connections(&self, refused: bool) {
        if refused {
            let task = self.accept_task.lock().expect("accept task lock").take();
            if let Some(task) = task {
                task.abort();
                let _ = task.await;
            }
            self.cut_all();
            return;
        }
        let listener = TcpListener::bind(self.address).await.expect("bind the proxy's port again");
        let task = tokio::spawn(accept_loop(listener, Arc::clone(&self.shared)));
        *self.accept_task.lock().expect("accept task lock") = Some(task);
    }

    /// Returns the number of websocket upgrades forwarded to the server since start.
    pub fn websocket_upgrades(&self) -> u64 {
        self.shared.websocket_upgrades.load(Ordering::SeqCst)
    }

    /// Returns the number of upgrades refused with the injected status since start.
    pub fn refused_upgrades(&self) -> u64 {
        self.shared.refused_upgrades.load(Ordering::SeqCst)
    }

    /// Returns the number of REST calls that got the injected 503 since start.
    pub fn rest_unavailable_answers(&self) -> u64 {
        self.shared.rest_unavailable_answers.load(Ordering::SeqCst)
    }

    /// Returns the number of open websocket connections.
    pub fn open_websockets(&self) -> usize {
        let connections = self.shared.connections.lock().expect("connection lock");
        connections.values().filter(|(kind, _)| *kind == Kind::Websocket).count()
    }

    fn cut(&self, select: impl Fn(Kind) -> bool) {
        let connections = self.shared.connections.lock().expect("connection lock");
        for (kind, token) in connections.values() {
            if select(*kind) {
                token.cancel();
            }
        }
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        if let Some(task) = self.accept_task.lock().expect("accept task lock").take() {
            task.abort();
        }
        self.cut_all();
    }
}

async fn accept_loop(listener: TcpListener, shared: Arc<Shared>) {
    loop {
        let Ok((client, _)) = listener.accept().await else { continue };
        tokio::spawn(serve_connection(client, Arc::clone(&shared)));
    }
}

async fn serve_connection(mut client: TcpStream, shared: Arc<Shared>) {
    let Some(head) = read_head(&mut client).await else { return };
    let kind = classify(&head);
    if let Some(answer) = injected_answer(kind, &shared) {
        let _ = client.write_all(answer.as_bytes()).await;
        let _ = client.shutdown().await;
        return;
    }
    let Ok(mut upstream) = TcpStream::connect(shared.upstream).await else { return };
    if upstream.write_all(&head).await.is_err() {
        return;
    }
    if kind == Kind::Websocket {
        shared.websocket_upgrades.fetch_add(1, Ordering::SeqCst);
    }

    let id = shared.next_id.fetch_add(1, Ordering::SeqCst);
    let token = CancellationToken::new();
    shared.connections.lock().expect("connection lock").insert(id, (kind, token.clone()));
    let stall = (kind == Kind::Websocket).then(|| shared.websocket_stall.subscribe());
    let (client_read, client_write) = client.split();
    let (upstream_read, upstream_write) = upstream.split();
    tokio::select! {
        () = token.cancelled() => {}
        () = pump(client_read, upstream_write, stall.clone()) => {}
        () = pump(upstream_read, client_write, stall) => {}
    }
    shared.connections.lock().expect("connection lock").remove(&id);
}

/// Reads until the end of the first request head. Returns every byte read, which may include
/// the start of the body.
async fn read_head(client: &mut TcpStream) -> Option<Vec<u8>> {
    let mut head = Vec::with_capacity(1024);
    let mut buffer = [0u8; 4096];
    while !head.windows(4).any(|window| window == b"\r\n\r\n") {
        let read = client.read(&mut buffer).await.ok()?;
        if read == 0 || head.len() > MAX_HEAD_BYTES {
            return None;
        }
        head.extend_from_slice(&buffer[..read]);
    }
    Some(head)
}

fn classify(head: &[u8]) -> Kind {
    let text = String::from_utf8_lossy(head).to_ascii_lowercase();
    if text.lines().any(|line| line.starts_with("upgrade:") && line.contains("websocket")) {
        Kind::Websocket
    } else {
        Kind::Rest
    }
}

fn injected_answer(kind: Kind, shared: &Shared) -> Option<String> {
    let faults = shared.faults.lock().expect("fault lock");
    match kind {
        Kind::Websocket => faults.refuse_upgrade.map(|status| {
            shared.refused_upgrades.fetch_add(1, Ordering::SeqCst);
            format!(
                "HTTP/1.1 {status} Refused by test proxy\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
            )
        }),
        Kind::Rest if faults.rest_unavailable => {
            shared.rest_unavailable_answers.fetch_add(1, Ordering::SeqCst);
            let body = r#"{"exception_message":"Service Unavailable"}"#;
            Some(format!(
                "HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\
                 Connection: close\r\n\r\n{body}",
                body.len()
            ))
        }
        Kind::Rest => None,
    }
}

/// Copies bytes from `from` to `to` until either side closes. While `stall` reads true it
/// stops reading, so nothing moves but the connection stays open.
async fn pump(
    mut from: impl AsyncRead + Unpin,
    mut to: impl AsyncWrite + Unpin,
    mut stall: Option<watch::Receiver<bool>>,
) {
    let mut buffer = vec![0u8; 16 * 1024];
    loop {
        if let Some(stall) = stall.as_mut() {
            if stall.wait_for(|stalled| !stalled).await.is_err() {
                return;
            }
        }
        let read = match from.read(&mut buffer).await {
            Ok(0) | Err(_) => return,
            Ok(read) => read,
        };
        if let Some(stall) = stall.as_mut() {
            // Bytes read just as a stall began are held until it ends.
            if stall.wait_for(|stalled| !stalled).await.is_err() {
                return;
            }
        }
        if to.write_all(&buffer[..read]).await.is_err() {
            return;
        }
    }
}
