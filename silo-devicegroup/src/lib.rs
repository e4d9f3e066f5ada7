//! silo-devicegroup: groups of silo devices that migrate together, and the
//! Go-silo-compatible device schema they are built from.
//!
//! ```text
//!   silo.conf (HCL/TOML/JSON) ──► schema::SiloSchema ──► DeviceGroup (sender)
//!                                        │ encode_device_hcl
//!                                        ▼
//!                         device info over the wire
//!                                        │ decode_device_hcl
//!                                        ▼
//!             policy::sanitize (receiver's trust policy) ──► tweak ──► DeviceGroup (receiver)
//! ```
//!
//! * [`schema`]: parsing, validation and encoding of device schemas.
//! * [`policy`]: what a receiver accepts from a sender-supplied schema.
#![forbid(unsafe_code)]

pub mod policy;
pub mod schema;

pub use policy::{rewrite_paths_into, sanitize, PolicyError, ReceivePolicy, ReceiverS3};
pub use schema::{
    decode_device_hcl, encode_device_hcl, DeviceSchema, Format, MigrationSchema, SchemaError,
    SiloSchema, SyncConfigSchema, SyncSchema, System, WriteCacheSchema,
};

/// The README's examples, compiled and run as doc tests.
#[doc = include_str!("../README.md")]
#[cfg(doctest)]
pub struct ReadmeDoctests;
