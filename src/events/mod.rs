//! The one Prefect events websocket that resolves waiting tool calls, with REST polling
//! while it is down.

mod message;
mod subscription;

pub use message::{auth_message, filter_message, parse_server_message, FlowRunStateEvent, ServerMessage};
pub use subscription::{FlowRunReader, Mode, Subscription, SubscriptionHandle, SubscriptionStatus};
