//! A Prefect events server written for the bench. It accepts one websocket on 127.0.0.1 in
//! its own OS thread and runtime and performs the `prefect` handshake. Once the bench calls
//! [`EventsServer::go`], it sends pre-serialised events as fast as the socket takes them.

use std::net::SocketAddr;
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context};
use futures::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;
use tokio::time::timeout;
use tokio_tungstenite::tungstenite::handshake::server::{ErrorResponse, Request, Response};
use tokio_tungstenite::tungstenite::http::{HeaderValue, StatusCode};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

use crate::frames::EventPlan;

/// Path the service connects to, below its API URL.
const EVENTS_PATH: &str = "/events/out";
/// Limit on each step that waits for the service: connecting, each handshake message, and
/// the close after the last frame.
const STEP_TIMEOUT: Duration = Duration::from_secs(30);

/// When the server sent its frames, by the monotonic clock shared with the service thread.
#[derive(Debug, Clone, Copy)]
pub struct SendReport {
    pub first_frame_at: Instant,
    pub last_frame_at: Instant,
    pub frames: usize,
    pub bytes: usize,
}

/// The running server thread.
pub struct EventsServer {
    address: SocketAddr,
    go: Option<oneshot::Sender<()>>,
    sent: Option<oneshot::Receiver<SendReport>>,
    thread: JoinHandle<anyhow::Result<()>>,
}

impl EventsServer {
    /// Serialises the frames of `plan`, binds a port on 127.0.0.1 and waits for the service
    /// in a new thread. Returns once the server listens.
    ///
    /// # Errors
    /// Fails when the thread, its runtime or the listener cannot be started.
    pub fn start(plan: &EventPlan) -> anyhow::Result<Self> {
        let plan = plan.clone();
        let (address_sender, address_receiver) = mpsc::channel();
        let (go, go_receiver) = oneshot::channel();
        let (sent_sender, sent) = oneshot::channel();
        let thread = std::thread::Builder::new()
            .name("bench-events-server".to_owned())
            .spawn(move || {
                let frames = plan.frames();
                let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
                runtime.block_on(async move {
                    let listener = TcpListener::bind("127.0.0.1:0").await?;
                    let _ = address_sender.send(listener.local_addr()?);
                    serve(listener, frames, go_receiver, sent_sender).await
                })
            })
            .context("starting the events server thread failed")?;
        let Ok(address) = address_receiver.recv() else {
            let error = join(thread).err().unwrap_or_else(|| anyhow::anyhow!("no error reported"));
            return Err(error.context("the events server stopped before it listened"));
        };
        Ok(Self { address, go: Some(go), sent: Some(sent), thread })
    }

    /// Returns the API URL to configure in the service, without the `/events/out` suffix.
    pub fn api_url(&self) -> String {
        format!("http://{}", self.address)
    }

    /// Lets the server start sending. Later calls do nothing.
    pub fn go(&mut self) {
        if let Some(go) = self.go.take() {
            let _ = go.send(());
        }
    }

    /// Waits until the server has handed its last frame to the socket.
    ///
    /// # Errors
    /// Fails when the server thread ended without sending, for example on a handshake error.
    pub async fn sent(&mut self) -> anyhow::Result<SendReport> {
        let sent = self.sent.take().context("the send report was already taken")?;
        sent.await.context("the events server stopped before sending every frame")
    }

    /// Waits for the thread to end, which it does once the service closed the socket.
    ///
    /// # Errors
    /// Returns the server's own error, such as a handshake message it did not expect.
    pub fn finish(self) -> anyhow::Result<()> {
        // Dropping the go sender first ends a server still waiting for it.
        let Self { go, thread, .. } = self;
        drop(go);
        join(thread)
    }
}

fn join(thread: JoinHandle<anyhow::Result<()>>) -> anyhow::Result<()> {
    match thread.join() {
        Ok(result) => result,
        Err(_) => bail!("the events server thread panicked"),
    }
}

async fn serve(
    listener: TcpListener,
    frames: Vec<Message>,
    go: oneshot::Receiver<()>,
    sent: oneshot::Sender<SendReport>,
) -> anyhow::Result<()> {
    let (stream, _) = timeout(STEP_TIMEOUT, listener.accept())
        .await
        .context("timed out waiting for the service to connect")??;
    stream.set_nodelay(true)?;
    let mut socket = tokio_tungstenite::accept_hdr_async(stream, check_upgrade).await?;
    expect_auth(&mut socket).await?;
    socket.send(Message::text(json!({"type": "auth_success"}).to_string())).await?;
    expect_filter(&mut socket).await?;

    // A dropped sender means the bench gave up before the clock started: nothing to send.
    if go.await.is_err() {
        return Ok(());
    }
    let report = send_all(&mut socket, frames).await?;
    let _ = sent.send(report);
    drain_until_closed(&mut socket).await
}

/// Accepts only what the service must send: the events path and the `prefect` subprotocol,
/// which the reply repeats as the websocket handshake requires.
#[allow(clippy::result_large_err, reason = "tungstenite's handshake callback fixes this signature")]
fn check_upgrade(request: &Request, mut response: Response) -> Result<Response, ErrorResponse> {
    if request.uri().path() != EVENTS_PATH {
        return Err(error_response(StatusCode::NOT_FOUND, format!("no websocket at {}", request.uri())));
    }
    let protocols = request.headers().get("Sec-WebSocket-Protocol").and_then(|value| value.to_str().ok());
    if !protocols.is_some_and(|list| list.split(',').any(|protocol| protocol.trim() == "prefect")) {
        return Err(error_response(StatusCode::BAD_REQUEST, "missing subprotocol prefect".to_owned()));
    }
    response.headers_mut().insert("Sec-WebSocket-Protocol", HeaderValue::from_static("prefect"));
    Ok(response)
}

fn error_response(status: StatusCode, reason: String) -> ErrorResponse {
    let mut response = ErrorResponse::new(Some(reason));
    *response.status_mut() = status;
    response
}

async fn expect_auth(socket: &mut WebSocketStream<TcpStream>) -> anyhow::Result<()> {
    let message = next_json(socket).await.context("reading the auth message failed")?;
    let expected = json!({"type": "auth", "token": null});
    ensure!(message == expected, "expected the auth message {expected}, received {message}");
    Ok(())
}

async fn expect_filter(socket: &mut WebSocketStream<TcpStream>) -> anyhow::Result<()> {
    let message = next_json(socket).await.context("reading the filter message failed")?;
    ensure!(message["type"] == "filter", "expected a filter message, received {message}");
    ensure!(message["filter"].is_object(), "the filter message has no filter object: {message}");
    Ok(())
}

/// Reads the next text frame as JSON, skipping pings and pongs.
async fn next_json(socket: &mut WebSocketStream<TcpStream>) -> anyhow::Result<Value> {
    loop {
        let frame = timeout(STEP_TIMEOUT, socket.next())
            .await
            .context("timed out waiting for a message from the service")?;
        match frame.context("the service closed the connection")?? {
            Message::Text(text) => return Ok(serde_json::from_str(text.as_str())?),
            Message::Ping(_) | Message::Pong(_) => continue,
            other => bail!("expected a text message, received {other:?}"),
        }
    }
}

/// Queues every frame and flushes once, so that the socket's write buffer batches them.
async fn send_all(
    socket: &mut WebSocketStream<TcpStream>,
    frames: Vec<Message>,
) -> anyhow::Result<SendReport> {
    let count = frames.len();
    let bytes = frames.iter().map(Message::len).sum();
    let first_frame_at = Instant::now();
    for frame in frames {
        socket.feed(frame).await.context("sending an event failed")?;
    }
    socket.flush().await.context("sending the last events failed")?;
    Ok(SendReport { first_frame_at, last_frame_at: Instant::now(), frames: count, bytes })
}

/// Reads until the service closes the socket at shutdown.
async fn drain_until_closed(socket: &mut WebSocketStream<TcpStream>) -> anyhow::Result<()> {
    loop {
        let frame = timeout(STEP_TIMEOUT, socket.next())
            .await
            .context("timed out waiting for the service to close the socket")?;
        match frame {
            None | Some(Ok(Message::Close(_))) => return Ok(()),
            Some(Ok(_)) => continue,
            // The service may drop the connection right after its close frame.
            Some(Err(_)) => return Ok(()),
        }
    }
}
