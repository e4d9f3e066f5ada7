//! Configuration of an S3-backed device: where it lives, how it is cut into
//! blocks, how hard to push the server and how to retry.
//!
//! Credentials are held in [`Secret`]s, whose `Debug` output is redacted and
//! which implement neither `Display` nor `Serialize`: a configuration can be
//! logged with `{:?}` without leaking keys, and cannot be written into a
//! schema or sent over the wire by accident.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use object_store::aws::{AmazonS3, AmazonS3Builder};
use object_store::{BackoffConfig, ClientOptions, RetryConfig};

use crate::error::{Result, S3Error};

/// Environment variable read by [`Credentials::from_env`] for the access key.
pub const ENV_ACCESS_KEY: &str = "AWS_ACCESS_KEY_ID";
/// Environment variable read by [`Credentials::from_env`] for the secret key.
pub const ENV_SECRET_KEY: &str = "AWS_SECRET_ACCESS_KEY";
/// Environment variable read by [`Credentials::from_env`] for a session token.
pub const ENV_SESSION_TOKEN: &str = "AWS_SESSION_TOKEN";

/// A string that must not be printed: `Debug` shows `"<redacted>"`.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(Arc<str>);

impl Secret {
    /// Wraps a secret value.
    pub fn new(value: impl Into<String>) -> Self {
        Secret(Arc::from(value.into()))
    }

    /// The secret itself, for handing to the client library only.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("\"<redacted>\"")
    }
}

/// S3 credentials (static keys, optionally with a session token).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Credentials {
    /// Access key id (not secret by itself, but kept out of logs anyway).
    pub access_key_id: Secret,
    /// Secret access key.
    pub secret_access_key: Secret,
    /// Session token for temporary credentials.
    pub session_token: Option<Secret>,
}

impl Credentials {
    /// Static credentials.
    pub fn new(access_key_id: impl Into<String>, secret_access_key: impl Into<String>) -> Self {
        Credentials {
            access_key_id: Secret::new(access_key_id),
            secret_access_key: Secret::new(secret_access_key),
            session_token: None,
        }
    }

    /// Reads `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY` and (optionally)
    /// `AWS_SESSION_TOKEN` from the environment.
    pub fn from_env() -> Result<Self> {
        let get = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());
        let access = get(ENV_ACCESS_KEY).ok_or_else(|| {
            S3Error::Config(format!("{ENV_ACCESS_KEY} is not set in the environment"))
        })?;
        let secret = get(ENV_SECRET_KEY).ok_or_else(|| {
            S3Error::Config(format!("{ENV_SECRET_KEY} is not set in the environment"))
        })?;
        Ok(Credentials {
            access_key_id: Secret::new(access),
            secret_access_key: Secret::new(secret),
            session_token: get(ENV_SESSION_TOKEN).map(Secret::new),
        })
    }
}

/// Retry and timeout policy for S3 requests. Transient failures (5xx,
/// connection errors, dropped connections, timeouts of idempotent requests)
/// are retried by `object_store` with exponential backoff and jitter; the
/// total time per request is bounded by `retry_timeout` (plus one request
/// timeout).
#[derive(Clone, Debug, PartialEq)]
pub struct RetrySettings {
    /// Maximum number of retries per request (0 disables retries).
    pub max_retries: usize,
    /// First backoff delay.
    pub initial_backoff: Duration,
    /// Largest backoff delay.
    pub max_backoff: Duration,
    /// No retry is started after this long since the first attempt.
    pub retry_timeout: Duration,
    /// Timeout of one HTTP request (connect to last byte).
    pub request_timeout: Duration,
    /// Timeout of establishing a connection.
    pub connect_timeout: Duration,
}

impl Default for RetrySettings {
    fn default() -> Self {
        RetrySettings {
            max_retries: 5,
            initial_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(5),
            retry_timeout: Duration::from_secs(60),
            request_timeout: Duration::from_secs(30),
            connect_timeout: Duration::from_secs(5),
        }
    }
}

impl RetrySettings {
    /// Short timeouts and few retries, for tests of failure paths.
    pub fn fast() -> Self {
        RetrySettings {
            max_retries: 3,
            initial_backoff: Duration::from_millis(20),
            max_backoff: Duration::from_millis(200),
            retry_timeout: Duration::from_secs(3),
            request_timeout: Duration::from_secs(5),
            connect_timeout: Duration::from_secs(1),
        }
    }
}

/// Where and how a device is stored in S3.
#[derive(Clone, Debug)]
pub struct S3Config {
    /// Endpoint URL, e.g. `http://127.0.0.1:9000`. `None` means AWS for
    /// `region`.
    pub endpoint: Option<String>,
    /// Bucket name (must exist).
    pub bucket: String,
    /// Key prefix of this device, e.g. `devices/disk0` (no leading or
    /// trailing `/` needed). Objects are `<prefix>/manifest.json`,
    /// `<prefix>/hashes.bin` and `<prefix>/blocks/<index, 16 hex digits>`.
    pub prefix: String,
    /// Region used for signing.
    pub region: String,
    /// Credentials. [`Credentials::from_env`] reads them from the environment.
    pub credentials: Credentials,
    /// Allow plain `http://` endpoints.
    pub allow_http: bool,
    /// Device size in bytes.
    pub size: u64,
    /// Block (= object) size in bytes; a non-zero power of two.
    pub block_size: u64,
    /// Maximum concurrent S3 requests of this device.
    pub concurrency: usize,
    /// Retry and timeout policy.
    pub retry: RetrySettings,
}

/// Default block size: 1 MiB (the device group's migration block size).
pub const DEFAULT_BLOCK_SIZE: u64 = 1 << 20;
/// Default number of concurrent requests.
pub const DEFAULT_CONCURRENCY: usize = 16;

impl S3Config {
    /// A configuration with defaults for everything but the location,
    /// credentials and size: region `us-east-1`, 1 MiB blocks, 16 concurrent
    /// requests, default retries, HTTPS only.
    pub fn new(
        endpoint: Option<String>,
        bucket: impl Into<String>,
        prefix: impl Into<String>,
        credentials: Credentials,
        size: u64,
    ) -> Self {
        S3Config {
            endpoint,
            bucket: bucket.into(),
            prefix: prefix.into(),
            region: "us-east-1".into(),
            credentials,
            allow_http: false,
            size,
            block_size: DEFAULT_BLOCK_SIZE,
            concurrency: DEFAULT_CONCURRENCY,
            retry: RetrySettings::default(),
        }
    }

    /// Checks the fields that can be checked without talking to S3.
    pub fn validate(&self) -> Result<()> {
        if self.bucket.is_empty() {
            return Err(S3Error::Config("the bucket name is empty".into()));
        }
        if self.block_size == 0 || !self.block_size.is_power_of_two() {
            return Err(S3Error::Config(format!(
                "block size {} is not a non-zero power of two",
                self.block_size
            )));
        }
        if self.block_size > (1 << 30) {
            return Err(S3Error::Config(format!(
                "block size {} is larger than 1 GiB",
                self.block_size
            )));
        }
        if self.concurrency == 0 {
            return Err(S3Error::Config("concurrency must be at least 1".into()));
        }
        if let Some(ep) = &self.endpoint {
            if ep.starts_with("http://") && !self.allow_http {
                return Err(S3Error::Config(format!(
                    "endpoint {ep} is plain HTTP but allow_http is false"
                )));
            }
        }
        crate::keys::parse_prefix(&self.prefix)?;
        Ok(())
    }

    /// A printable name of the endpoint (for messages; no credentials).
    pub fn endpoint_name(&self) -> String {
        self.endpoint
            .clone()
            .unwrap_or_else(|| format!("AWS S3 ({})", self.region))
    }

    /// Builds the `object_store` client for this configuration.
    pub fn build_store(&self) -> Result<AmazonS3> {
        self.validate()?;
        let r = &self.retry;
        let retry = RetryConfig {
            backoff: BackoffConfig {
                init_backoff: r.initial_backoff,
                max_backoff: r.max_backoff,
                base: 2.0,
            },
            max_retries: r.max_retries,
            retry_timeout: r.retry_timeout,
        };
        let client = ClientOptions::new()
            .with_timeout(r.request_timeout)
            .with_connect_timeout(r.connect_timeout)
            .with_allow_http(self.allow_http);
        let mut b = AmazonS3Builder::new()
            .with_client_options(client)
            .with_bucket_name(&self.bucket)
            .with_region(&self.region)
            .with_access_key_id(self.credentials.access_key_id.expose())
            .with_secret_access_key(self.credentials.secret_access_key.expose())
            .with_virtual_hosted_style_request(false)
            .with_allow_http(self.allow_http)
            .with_retry(retry);
        if let Some(t) = &self.credentials.session_token {
            b = b.with_token(t.expose());
        }
        if let Some(ep) = &self.endpoint {
            b = b.with_endpoint(ep);
        }
        // The builder's error never contains the keys (it reports missing or
        // malformed fields), but keep only its message to be sure of the type.
        b.build()
            .map_err(|e| S3Error::Config(format!("cannot build the S3 client: {e}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_are_redacted_in_debug() {
        let mut cfg = S3Config::new(
            Some("http://127.0.0.1:1".into()),
            "b",
            "p",
            Credentials::new("AKIAEXAMPLE", "super-secret-value"),
            4096,
        );
        cfg.credentials.session_token = Some(Secret::new("token-value"));
        let s = format!("{cfg:?}");
        assert!(!s.contains("super-secret-value"), "{s}");
        assert!(!s.contains("AKIAEXAMPLE"), "{s}");
        assert!(!s.contains("token-value"), "{s}");
        assert!(s.contains("redacted"), "{s}");
    }

    #[test]
    fn validation_catches_bad_fields() {
        let base = S3Config::new(
            Some("http://127.0.0.1:1".into()),
            "b",
            "p",
            Credentials::new("a", "s"),
            4096,
        );
        assert!(matches!(base.validate(), Err(S3Error::Config(m)) if m.contains("allow_http")));
        let mut ok = base.clone();
        ok.allow_http = true;
        ok.validate().unwrap();
        let mut bad = ok.clone();
        bad.block_size = 3000;
        assert!(bad.validate().is_err());
        let mut bad = ok.clone();
        bad.concurrency = 0;
        assert!(bad.validate().is_err());
        let mut bad = ok.clone();
        bad.bucket.clear();
        assert!(bad.validate().is_err());
    }

    #[test]
    fn credentials_from_env() {
        // The only test in this binary that touches these variables.
        std::env::remove_var(ENV_ACCESS_KEY);
        std::env::remove_var(ENV_SECRET_KEY);
        let e = Credentials::from_env().unwrap_err();
        assert!(e.to_string().contains(ENV_ACCESS_KEY), "{e}");
        std::env::set_var(ENV_ACCESS_KEY, "env-access");
        assert!(Credentials::from_env()
            .unwrap_err()
            .to_string()
            .contains(ENV_SECRET_KEY));
        std::env::set_var(ENV_SECRET_KEY, "env-secret");
        std::env::set_var(ENV_SESSION_TOKEN, "env-token");
        let c = Credentials::from_env().unwrap();
        assert_eq!(c.access_key_id.expose(), "env-access");
        assert_eq!(c.secret_access_key.expose(), "env-secret");
        assert_eq!(
            c.session_token.as_ref().map(Secret::expose),
            Some("env-token")
        );
        for v in [ENV_ACCESS_KEY, ENV_SECRET_KEY, ENV_SESSION_TOKEN] {
            std::env::remove_var(v);
        }
    }
}
