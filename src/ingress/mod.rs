//! The ingress stage: the gRPC and HTTP doors senders call.
//!
//! Input: requests. Output: calls into [`crate::normalize`] and [`crate::ingest::Ingest`], and
//! answers in each protocol's terms. The doors hold no state of their own and share one
//! validation and one error type, so gRPC and HTTP answer alike.

pub mod grpc;
pub mod health;
pub mod http;
pub mod http_server;
pub mod signature;
