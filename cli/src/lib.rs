//! devloop's cli as a library: the `devloop` binary is a thin shell over these modules.
#![forbid(unsafe_code)]

pub mod agent_link;
pub mod backend;
pub mod commands;
pub mod config;
pub mod deploy;
pub mod elf;
pub mod engine;
pub mod failpoint;
pub mod image;
pub mod intercept;
pub mod labels;
pub mod oci;
pub mod ownership;
pub mod signals;
pub mod state;
pub mod status;
pub mod sync;
pub mod ui;
