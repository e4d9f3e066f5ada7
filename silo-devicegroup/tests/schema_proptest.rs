//! Property tests: the parsers never panic on any input, and every valid
//! schema survives encode → parse unchanged (HCL, TOML, JSON).

use std::path::PathBuf;
use std::time::Duration;

use proptest::prelude::*;
use silo_devicegroup::policy::{sanitize, ReceivePolicy};
use silo_devicegroup::schema::{
    decode_device_hcl, encode_device_hcl, DeviceSchema, Format, MigrationSchema, SiloSchema,
    SyncConfigSchema, SyncSchema, System, WriteCacheSchema, MAX_DEVICE_SIZE,
};

const EXAMPLE: &str = include_str!("data/silo.example.conf");

fn parse_all(text: &str) {
    for f in [Format::Hcl, Format::Toml, Format::Json] {
        let _ = SiloSchema::parse(text, "fuzz", f);
    }
    if let Ok(d) = decode_device_hcl(text, "fuzz") {
        // Whatever parses must re-encode and parse to the same value.
        let again = decode_device_hcl(&encode_device_hcl(&d), "re-encoded").unwrap();
        assert_eq!(again, d);
    }
}

const TOKENS: &[&str] = &[
    "device",
    "\"x\"",
    "x",
    "{",
    "}",
    "=",
    "\n",
    "system",
    "\"memory\"",
    "\"file\"",
    "size",
    "\"1g\"",
    "1234",
    "blocksize",
    "\"3000\"",
    "source",
    "sync",
    "config",
    "migration",
    "writecache",
    "anyorder",
    "true",
    "[",
    "]",
    "(",
    ")",
    "${",
    "%{",
    "<<EOF",
    "EOF",
    "#",
    "//",
    "/*",
    "*/",
    "1.5e99",
    "-",
    "!",
    ",",
    ".",
    "\"",
    "\\",
    "location",
    "\"\"",
    "null",
    "for",
    "in",
    ":",
    "?",
    "99999999999999999999999",
    "0x10",
    "µ",
    "\u{feff}",
    "\r\n",
    "\t",
];

fn token_soup() -> impl Strategy<Value = String> {
    prop::collection::vec((prop::sample::select(TOKENS), prop::bool::ANY), 0..80).prop_map(|toks| {
        toks.into_iter()
            .map(|(t, sp)| if sp { format!("{t} ") } else { t.to_string() })
            .collect()
    })
}

#[derive(Debug, Clone)]
enum Mutation {
    Delete(usize, usize),
    Insert(usize, String),
    Replace(usize, char),
    Duplicate(usize, usize, usize),
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        (any::<usize>(), 1usize..40).prop_map(|(a, n)| Mutation::Delete(a, n)),
        (
            any::<usize>(),
            prop_oneof![
                prop::sample::select(TOKENS).prop_map(str::to_string),
                ".{0,8}".prop_map(|s: String| s),
            ]
        )
            .prop_map(|(a, s)| Mutation::Insert(a, s)),
        (any::<usize>(), any::<char>()).prop_map(|(a, c)| Mutation::Replace(a, c)),
        (any::<usize>(), 1usize..60, any::<usize>())
            .prop_map(|(a, n, b)| Mutation::Duplicate(a, n, b)),
    ]
}

fn mutate(text: &str, muts: &[Mutation]) -> String {
    let mut c: Vec<char> = text.chars().collect();
    for m in muts {
        let len = c.len().max(1);
        match m {
            Mutation::Delete(a, n) => {
                let a = a % len;
                let b = (a + n).min(c.len());
                if a < b {
                    c.drain(a..b);
                }
            }
            Mutation::Insert(a, s) => {
                let a = a % (c.len() + 1);
                c.splice(a..a, s.chars());
            }
            Mutation::Replace(a, ch) => {
                if !c.is_empty() {
                    let a = a % c.len();
                    c[a] = *ch;
                }
            }
            Mutation::Duplicate(a, n, to) => {
                let a = a % len;
                let b = (a + n).min(c.len());
                if a < b {
                    let piece: Vec<char> = c[a..b].to_vec();
                    let to = to % (c.len() + 1);
                    c.splice(to..to, piece);
                }
            }
        }
    }
    c.into_iter().collect()
}

// ----- generators of valid schemas ------------------------------------------------

fn text_without_nul() -> impl Strategy<Value = String> {
    prop_oneof![
        "[a-zA-Z0-9_./-]{1,24}",
        "[^\u{0}]{1,24}",
        Just("${var.x}/%{ if }\"q\"\\".to_string()),
    ]
}

fn name() -> impl Strategy<Value = String> {
    // Names may hold anything but control characters.
    prop_oneof!["[a-zA-Z0-9_-]{1,16}", "[^\u{0}-\u{1f}\u{7f}-\u{9f}]{1,16}"]
}

fn power_of_two_block() -> impl Strategy<Value = u64> {
    (9u32..=26).prop_map(|s| 1u64 << s)
}

fn duration() -> impl Strategy<Value = Duration> {
    prop_oneof![
        (1u64..100_000).prop_map(Duration::from_millis),
        (1u64..1_000_000_000).prop_map(Duration::from_nanos),
        (1u64..48).prop_map(|h| Duration::from_secs(h * 3600)),
    ]
}

fn sync(block_size: u64) -> impl Strategy<Value = SyncSchema> {
    let max_shift = (block_size / 512).trailing_zeros();
    (
        (
            any::<bool>(),
            text_without_nul(),
            text_without_nul(),
            text_without_nul(),
        ),
        (
            "[a-z0-9.-]{1,12}",
            ".{0,8}",
            ".{0,8}",
            any::<bool>(),
            1u32..=4096,
        ),
        (
            any::<bool>(),
            0..=max_shift,
            duration(),
            any::<u32>(),
            duration(),
            any::<u32>(),
            1u32..=4096,
        ),
    )
        .prop_map(
            |(
                (secure, access_key, secret_key, endpoint),
                (bucket, prefix, grab_prefix, auto_start, grab_concurrency),
                c,
            )| SyncSchema {
                secure,
                access_key,
                secret_key,
                endpoint,
                bucket,
                prefix,
                grab_prefix,
                auto_start,
                grab_concurrency,
                config: SyncConfigSchema {
                    only_dirty: c.0,
                    block_shift: c.1,
                    max_age: c.2,
                    min_changed: c.3,
                    check_period: c.4,
                    limit: c.5,
                    concurrency: c.6,
                },
            },
        )
}

fn plain_device(size: u64) -> impl Strategy<Value = DeviceSchema> {
    (
        name(),
        prop::sample::select(System::ALL.to_vec()),
        prop::option::of(power_of_two_block()),
        (
            any::<bool>(),
            prop::option::of(text_without_nul()),
            prop::option::of(text_without_nul()),
        ),
        (
            any::<bool>(),
            prop::option::of(text_without_nul()),
            prop::option::of(text_without_nul()),
        ),
        prop::option::of(any::<i64>()),
        prop::option::of(any::<bool>()),
        prop::option::of((
            0u64..1 << 30,
            1u64..1 << 30,
            duration(),
            prop::option::of(power_of_two_block()),
        )),
    )
        .prop_map(
            move |(
                name,
                system,
                block_size,
                (expose, location, source_hashes),
                (source_shared, load_binlog, binlog),
                pid,
                any_order,
                wc,
            )| {
                let mut d = DeviceSchema::new(name, system, size);
                d.block_size = block_size;
                d.expose = expose;
                d.location = location.map(PathBuf::from);
                if system == System::S3 {
                    // An s3 URL: the generated text, reduced to safe key characters.
                    let key: String = d
                        .location
                        .take()
                        .map(|l| l.to_string_lossy().into_owned())
                        .unwrap_or_default()
                        .chars()
                        .filter(|c| c.is_ascii_alphanumeric())
                        .collect();
                    d.location = Some(PathBuf::from(format!("s3://bucket/{key}")));
                }
                if system.needs_location() && d.location.is_none() {
                    d.location = Some(PathBuf::from("disk.img"));
                }
                d.source_hashes = source_hashes.map(PathBuf::from);
                d.source_shared = source_shared;
                d.load_binlog = load_binlog.map(PathBuf::from);
                d.binlog = binlog.map(PathBuf::from);
                d.pid = pid;
                d.migration = any_order.map(|any_order| MigrationSchema { any_order });
                d.write_cache = wc.map(|(a, b, flush_period, block_size)| WriteCacheSchema {
                    min_size: a.min(b),
                    max_size: a.max(b),
                    flush_period,
                    block_size,
                });
                d
            },
        )
}

fn device() -> impl Strategy<Value = DeviceSchema> {
    (1u64..=MAX_DEVICE_SIZE)
        .prop_flat_map(|size| {
            (
                plain_device(size),
                prop::collection::vec(plain_device(size), 0..3),
            )
        })
        .prop_flat_map(|(mut d, sources)| {
            // Chain the sources: d <- s0 <- s1 ...
            let mut chain: Option<Box<DeviceSchema>> = None;
            for mut s in sources.into_iter().rev() {
                s.source = chain.take();
                chain = Some(Box::new(s));
            }
            d.source = chain;
            let bs = d.block_size.unwrap_or(1 << 20);
            (Just(d), prop::option::of(sync(bs)))
        })
        .prop_map(|(mut d, s)| {
            if s.is_some() && d.block_size.is_none() {
                d.block_size = Some(1 << 20);
            }
            d.sync = s;
            d
        })
}

proptest! {

    #[test]
    fn arbitrary_strings_never_panic(text in ".{0,400}") {
        parse_all(&text);
    }

    #[test]
    fn arbitrary_bytes_as_lossy_text_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..400)) {
        parse_all(&String::from_utf8_lossy(&bytes));
    }

    #[test]
    fn token_soup_never_panics(text in token_soup()) {
        parse_all(&text);
    }

    #[test]
    fn mutated_example_never_panics(muts in prop::collection::vec(mutation(), 1..6)) {
        parse_all(&mutate(EXAMPLE, &muts));
    }

    #[test]
    fn mutated_encoded_device_never_panics(d in device(), muts in prop::collection::vec(mutation(), 1..4)) {
        parse_all(&mutate(&encode_device_hcl(&d), &muts));
    }

    #[test]
    fn valid_devices_round_trip_through_hcl(d in device()) {
        prop_assert!(d.validate().is_ok(), "{:?}", d.validate());
        let text = encode_device_hcl(&d);
        let back = decode_device_hcl(&text, "<wire>");
        prop_assert!(back.is_ok(), "{:?}\n{}", back, text);
        prop_assert_eq!(back.unwrap(), d);
    }

    #[test]
    fn valid_schemas_round_trip_through_toml_and_json(devs in prop::collection::vec(device(), 0..3)) {
        let mut s = SiloSchema { devices: devs };
        for (i, d) in s.devices.iter_mut().enumerate() {
            d.name = format!("{}-{i}", d.name);
        }
        prop_assert_eq!(SiloSchema::parse_hcl(&s.to_hcl(), "a.hcl").unwrap(), s.clone());
        prop_assert_eq!(SiloSchema::parse_toml(&s.to_toml().unwrap(), "a.toml").unwrap(), s.clone());
        prop_assert_eq!(SiloSchema::parse_json(&s.to_json().unwrap(), "a.json").unwrap(), s);
    }

    #[test]
    fn validate_and_sanitize_never_panic(
        d in device(),
        size in any::<u64>(),
        bs in prop::option::of(any::<u64>()),
        shift in any::<u32>(),
    ) {
        let mut d = d;
        d.size = size;
        d.block_size = bs;
        if let Some(s) = d.sync.as_mut() {
            s.config.block_shift = shift;
        }
        let _ = d.validate();
        let dir = std::env::temp_dir();
        if let Ok(clean) = sanitize(&ReceivePolicy::new(&dir), d.clone()) {
            prop_assert!(clean.validate().is_ok());
            prop_assert!(!clean.expose);
        }
        let _ = decode_device_hcl(&encode_device_hcl(&d), "x");
    }
}
