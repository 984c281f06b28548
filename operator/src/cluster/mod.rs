//! Everything that talks to Kubernetes besides the controller loop and the platform: the
//! migration Job as an object (built, its outcome read).

pub mod migration_job;
