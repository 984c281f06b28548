//! The cutover operator: moves an application from one PostgreSQL database (blue) to another
//! (green) with seconds of write downtime and a way back.
//!
//! - [`api`]: the `DatabaseCutover` resource (pure data and validation).
//! - [`plan`]: the sequence as pure functions of (spec, status, observations, now).
//! - [`postgres`]: everything that talks SQL.
//! - [`cluster`]: the migration Job as a Kubernetes object.
//! - [`platform`]: what differs between Kubernetes and local mode (Jobs, the Secret, restarts).
//! - [`engine`]: observe and act, one step at a time, for the operator, local mode and tests.
//! - [`controller`]: the kube-runtime controller.
//! - [`metrics`]: Prometheus metrics and the probe endpoints.

pub mod api;
pub mod cluster;
pub mod controller;
pub mod engine;
pub mod metrics;
pub mod plan;
pub mod platform;
pub mod postgres;
