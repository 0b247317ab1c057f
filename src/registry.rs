//! The public registry (discovery layer 3, DESIGN §1.1): `arknet registry serve`.
//!
//! Nodes publish a signed [`record::Record`] (node id, key, mesh endpoint, advertised models)
//! and learn about nodes beyond their LAN. A listing grants nothing: a node found here is
//! pending on every other node until its owner approves it. [`record`] holds the wire format
//! and the pure checks of a write.

pub mod record;
pub mod store;
