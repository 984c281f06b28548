//! Everything that talks to Kubernetes besides the controller loop: reading connection strings
//! from Secrets (and keeping them out of logs), Jobs, the Secret switch, workload restarts.

pub mod migration_job;
pub mod platform;
