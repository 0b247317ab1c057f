//! Shared test support: a fake model server, a blocking HTTP client, and the grid harness that
//! runs real `arknet` processes. Each test binary uses a different subset, hence the allow.
#![allow(dead_code)]

pub mod avahi;
pub mod blobs;
pub mod child;
pub mod fake_backend;
pub mod grid;
pub mod http;
pub mod mesh;
pub mod netns;
pub mod nginx;
pub mod postgres;
pub mod process;
pub mod python;
pub mod registry;
