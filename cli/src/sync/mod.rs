//! The file sync, as pure steps and one driver: [`scan`] reads the laptop, [`diff`] decides,
//! [`send`] puts changes on the wire, [`engine`] runs it all for one service.

pub mod diff;
pub mod engine;
pub mod filter;
pub mod scan;
pub mod send;
