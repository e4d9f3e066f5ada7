//! silo-devicegroup: groups of silo devices that migrate together, and the
//! Go-silo-compatible device schema they are built from.
//!
//! ```text
//!   silo.conf (HCL/TOML/JSON) ──► schema::SiloSchema ──► DeviceGroup::new_from_schema (sender)
//!                                        │ encode_device_hcl
//!                                        ▼
//!                         device-group info over the wire
//!                                        │ decode_device_hcl
//!                                        ▼
//!    policy::sanitize (receiver's trust policy) ──► tweak ──► DeviceGroup::new_from_protocol (receiver)
//! ```
//!
//! * [`schema`]: parsing, validation and encoding of device schemas.
//! * [`policy`]: what a receiver accepts from a sender-supplied schema.
//! * [`device`]: a provider chain from a schema.
//! * [`DeviceGroup`]: the migration API (see the README for the lifecycle
//!   and the cut-over sequence).
#![forbid(unsafe_code)]

pub mod device;
pub mod error;
mod group;
pub mod hooks;
pub mod policy;
pub mod s3;
pub mod schema;

pub use device::{build_device, BuildOptions, BuiltDevice};
pub use error::{Error, Result};
pub use group::{
    BlockObserverFn, DeviceGroup, DeviceMetrics, GroupOptions, ReceiveOptions, CUSTOM_DATA,
    DEFAULT_VOLATILITY_WINDOW, EVENT_READY, EVENT_REFUSED,
};
pub use hooks::{
    default_continue, CustomDataHandler, DefaultHooks, DeviceProgress, MigrateDirtyHooks,
    ProgressHandler,
};
pub use policy::{rewrite_paths_into, sanitize, PolicyError, ReceivePolicy, ReceiverS3};
pub use s3::{
    device_prefix, parse_s3_location, sync_s3_config, sync_settings, AssistMetrics, S3Access,
};
pub use schema::{
    decode_device_hcl, encode_device_hcl, DeviceSchema, Format, MigrationSchema, SchemaError,
    SiloSchema, SyncConfigSchema, SyncSchema, System, WriteCacheSchema,
};
pub use silo_protocol::bridge::ToProtocol;
pub use silo_protocol::Connection;

/// The README's examples, compiled and run as doc tests.
#[doc = include_str!("../README.md")]
#[cfg(doctest)]
pub struct ReadmeDoctests;
