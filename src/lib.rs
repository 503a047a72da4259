//! Runs submitted Python code as Prefect 3 flow runs and learns their completion from one
//! Prefect events websocket, exposed as an MCP tool.
//!
//! Layers, from the bottom: [`prefect`] (REST types and client, no waiting logic),
//! [`waiters`] (flow-run id to pending caller), [`events`] (the one subscription task that
//! resolves waiters), [`jobs`] (validate, submit, wait, read the result) and [`mcp`] (the tool).

pub mod backoff;
pub mod cli;
pub mod config;
pub mod events;
pub mod jobs;
pub mod mcp;
pub mod prefect;
pub mod waiters;
