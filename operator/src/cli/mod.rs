//! The subcommands of the `cutover` binary that a person or a Job runs by hand; one file per verb.
pub mod kubectl;
pub mod lint;
pub mod local;
pub mod migrate;
pub mod verify;
pub mod wait;
