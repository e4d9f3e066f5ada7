//! Parsing, encoding and validation of device schemas.

use std::path::PathBuf;
use std::time::Duration;

use silo_devicegroup::schema::{
    decode_device_hcl, encode_device_hcl, DeviceSchema, Format, SchemaError, SiloSchema, System,
    DEFAULT_BLOCK_SIZE,
};

const EXAMPLE: &str = include_str!("data/silo.example.conf");

fn example() -> SiloSchema {
    SiloSchema::parse_hcl(EXAMPLE, "silo.example.conf").expect("example parses")
}

#[test]
fn example_config_parses_every_field() {
    let s = example();
    assert_eq!(s.devices.len(), 4);

    let m = &s.devices[0];
    assert_eq!(m.name, "Memory1", "bare identifier label");
    assert_eq!(m.system, System::Memory);
    assert_eq!(m.size_bytes(), 64 << 20);
    assert_eq!(m.block_size_bytes(), 64 << 10);
    assert!(!m.expose);
    assert!(m.any_order());

    let d = s.device("disk0").unwrap();
    assert_eq!(d.system, System::File);
    assert_eq!(d.size_bytes(), 1 << 30, "upper-case G suffix");
    assert_eq!(d.block_size_bytes(), 1 << 20);
    assert!(d.expose);
    assert_eq!(d.location, Some(PathBuf::from("./testdata/disk0")));
    assert_eq!(d.binlog, Some(PathBuf::from("./testdata/disk0.binlog")));
    assert_eq!(
        d.load_binlog,
        Some(PathBuf::from("./testdata/disk0.load.binlog"))
    );
    assert_eq!(
        d.source_hashes,
        Some(PathBuf::from("./testdata/base.hashes"))
    );
    assert!(d.source_shared);
    assert_eq!(d.pid, Some(1234));
    assert_eq!(
        d.cow_state_file(),
        Some(std::path::Path::new("./testdata/disk0.cow.state"))
    );
    let src = d.source.as_deref().unwrap();
    assert_eq!(src.system, System::File);
    assert_eq!(src.size_bytes(), 1 << 30);
    assert_eq!(src.location, Some(PathBuf::from("./testdata/base.img")));

    let sync = d.sync.as_ref().unwrap();
    assert!(!sync.secure);
    assert_eq!(sync.access_key, "silosilo");
    assert_eq!(sync.secret_key, "silosilo");
    assert_eq!(sync.endpoint, "localhost:9000");
    assert_eq!(sync.bucket, "silosilo");
    assert_eq!(sync.prefix, "hop1-");
    assert_eq!(sync.grab_prefix, "hop0-");
    assert!(sync.auto_start);
    assert_eq!(sync.grab_concurrency, 32);
    let c = &sync.config;
    assert!(!c.only_dirty);
    assert_eq!(c.block_shift, 2);
    assert_eq!(c.max_age, Duration::from_millis(100));
    assert_eq!(c.min_changed, 4);
    assert_eq!(c.limit, 256);
    assert_eq!(c.check_period, Duration::from_secs(1));
    assert_eq!(c.concurrency, 10);
    assert_eq!(d.sync_tracking_block_size(), Some(256 << 10));

    let w = d.write_cache.as_ref().unwrap();
    assert_eq!(w.min_size, 8 << 20);
    assert_eq!(w.max_size, 64 << 20);
    assert_eq!(w.flush_period, Duration::from_secs(10));
    assert_eq!(w.block_size, Some(4096));

    let sp = s.device("sparse").unwrap();
    assert_eq!(sp.system, System::SparseFile);
    assert_eq!(sp.size_bytes(), 4 << 40, "t suffix");
    assert_eq!(sp.block_size, None);
    assert_eq!(sp.block_size_bytes(), DEFAULT_BLOCK_SIZE);
    assert_eq!(DEFAULT_BLOCK_SIZE, 1 << 20);

    let odd = s.device("odd").unwrap();
    assert_eq!(odd.size_bytes(), 1_234_567, "plain integer size");
    assert_eq!(odd.num_blocks(), 2);
}

#[test]
fn secret_key_is_redacted_in_debug() {
    let s = example();
    let dbg = format!("{:?}", s.device("disk0").unwrap().sync);
    assert!(dbg.contains("<redacted>"));
    assert!(!dbg.contains("secret_key: \"silosilo\""));
}

#[test]
fn every_device_round_trips_through_encode_device_hcl() {
    for dev in example().devices {
        let text = encode_device_hcl(&dev);
        assert!(
            text.starts_with(&format!("device \"{}\" {{", dev.name)),
            "{text}"
        );
        let back = decode_device_hcl(&text, "<device info>").unwrap();
        assert_eq!(back, dev, "{text}");
        assert_eq!(dev.to_hcl(), text);
    }
}

#[test]
fn whole_schema_round_trips_through_hcl_toml_json() {
    let s = example();
    assert_eq!(SiloSchema::parse_hcl(&s.to_hcl(), "a.hcl").unwrap(), s);
    assert_eq!(
        SiloSchema::parse_toml(&s.to_toml().unwrap(), "a.toml").unwrap(),
        s
    );
    assert_eq!(
        SiloSchema::parse_json(&s.to_json().unwrap(), "a.json").unwrap(),
        s
    );
}

#[test]
fn toml_and_json_files_equal_the_hcl_example() {
    let hcl = example();
    let toml = SiloSchema::from_file("tests/data/silo.example.toml").unwrap();
    let json = SiloSchema::from_file("tests/data/silo.example.json").unwrap();
    assert_eq!(toml, hcl);
    assert_eq!(json, hcl);
    assert_eq!(
        SiloSchema::from_file("tests/data/silo.example.conf").unwrap(),
        hcl
    );
    assert_eq!(
        Format::from_path(std::path::Path::new("x.TOML")),
        Format::Toml
    );
}

#[test]
fn go_style_conversions_are_accepted() {
    // HCL converts between literal types; Go silo's decoder does too.
    let s = SiloSchema::parse_hcl(
        "device \"x\" {\n  system = \"memory\"\n  size = 4096\n  expose = \"true\"\n  pid = \"12\"\n  location = \"\"\n}\n",
        "t",
    )
    .unwrap();
    let d = &s.devices[0];
    assert_eq!(d.size, 4096);
    assert!(d.expose);
    assert_eq!(d.pid, Some(12));
    assert_eq!(d.location, None, "empty path means unset, as in Go");
}

#[test]
fn decode_device_hcl_wants_exactly_one_device() {
    let two = "device a {\n system = \"memory\"\n size = \"1m\"\n}\ndevice b {\n system = \"memory\"\n size = \"1m\"\n}\n";
    let e = decode_device_hcl(two, "<peer>").unwrap_err();
    assert!(e.to_string().contains("exactly one device"), "{e}");
    assert!(decode_device_hcl("", "<peer>").is_err());
}

#[test]
fn sync_block_size_must_match_migration_block_size_at_start_up() {
    let d = example().device("disk0").unwrap().clone();
    d.check_sync_block_size(1 << 20).unwrap();
    let e = d.check_sync_block_size(4096).unwrap_err();
    assert!(matches!(e, SchemaError::SyncBlockSize { .. }), "{e}");
    assert!(e.to_string().contains("device \"disk0\".blocksize"), "{e}");
    // Devices without sync have nothing to check.
    DeviceSchema::new("m", System::Memory, 4096)
        .check_sync_block_size(4096 * 2)
        .unwrap();
}

#[test]
fn validate_on_built_schemas() {
    let mut d = DeviceSchema::new("m", System::File, 1 << 20);
    assert!(matches!(
        d.validate(),
        Err(SchemaError::MissingLocation { .. })
    ));
    d.location = Some("/tmp/x".into());
    d.validate().unwrap();
    d.block_size = Some(1000);
    assert!(matches!(
        d.validate(),
        Err(SchemaError::BadBlockSize { .. })
    ));
}

// ----- validation errors name file, line and field -------------------------------

/// Parses `text` as `bad.conf`, expects an error on `line` whose message names
/// `field`, and returns it.
fn hcl_err(text: &str, line: usize, field: &str) -> SchemaError {
    let e = SiloSchema::parse_hcl(text, "bad.conf").expect_err("must be refused");
    let msg = e.to_string();
    assert_eq!(e.line(), Some(line), "wrong line in: {msg}");
    assert!(msg.starts_with(&format!("bad.conf:{line}:")), "{msg}");
    assert!(msg.contains(field), "field {field:?} not named in: {msg}");
    e
}

fn dev(body: &str) -> String {
    format!("# a comment\ndevice \"d\" {{\n{body}}}\n")
}

#[test]
fn unknown_system() {
    let e = hcl_err(
        &dev("  system = \"floppy\"\n  size = \"1m\"\n"),
        3,
        "device \"d\".system",
    );
    assert!(matches!(e, SchemaError::UnknownSystem { ref value, .. } if value == "floppy"));
}

#[test]
fn zero_size() {
    let e = hcl_err(
        &dev("  system = \"memory\"\n  size = \"0k\"\n"),
        4,
        "device \"d\".size",
    );
    assert!(matches!(e, SchemaError::ZeroSize { .. }));
}

#[test]
fn absurd_size() {
    let e = hcl_err(
        &dev("  system = \"memory\"\n\n  size = \"2048t\"\n"),
        5,
        "device \"d\".size",
    );
    assert!(matches!(e, SchemaError::SizeTooLarge { bytes, .. } if bytes == 2 << 50));
}

#[test]
fn bad_size_strings() {
    for bad in [
        "\"12x\"",
        "\"1.5g\"",
        "\"-1\"",
        "\"\"",
        "\"99999999999999g\"",
        "-5",
    ] {
        let e = hcl_err(
            &dev(&format!("  system = \"memory\"\n  size = {bad}\n")),
            4,
            "device \"d\".size",
        );
        assert!(
            matches!(
                e,
                SchemaError::BadSize { .. } | SchemaError::InvalidValue { .. }
            ),
            "{bad}: {e}"
        );
    }
}

#[test]
fn block_sizes_must_be_powers_of_two_in_range() {
    for (bs, why) in [
        ("3000", "power of two"),
        ("256", "512"),
        ("128m", "64 MiB"),
        ("0", "power of two"),
    ] {
        let e = hcl_err(
            &dev(&format!(
                "  system = \"memory\"\n  size = \"1g\"\n  blocksize = \"{bs}\"\n"
            )),
            5,
            "device \"d\".blocksize",
        );
        assert!(matches!(e, SchemaError::BadBlockSize { .. }), "{e}");
        assert!(e.to_string().contains(why), "{e}");
    }
    // Inside writecache too.
    let e = hcl_err(
        &dev("  system = \"memory\"\n  size = \"1g\"\n  writecache {\n    minsize = \"1m\"\n    maxsize = \"2m\"\n    flushperiod = \"1s\"\n    blocksize = \"5k\"\n  }\n"),
        9,
        "device \"d\".writecache.blocksize",
    );
    assert!(matches!(e, SchemaError::BadBlockSize { .. }));
}

#[test]
fn missing_location_for_file_systems() {
    for sys in ["file", "sparsefile"] {
        let e = hcl_err(
            &dev(&format!("  size = \"1g\"\n  system = \"{sys}\"\n")),
            4,
            "device \"d\".location",
        );
        assert!(matches!(e, SchemaError::MissingLocation { .. }));
        assert!(e.to_string().contains(sys));
    }
    // Nested copy-on-write base too.
    hcl_err(
        &dev("  system = \"memory\"\n  size = \"1g\"\n  source \"s.state\" {\n    system = \"file\"\n    size = \"1g\"\n  }\n"),
        6,
        "device \"d\".source \"s.state\".location",
    );
}

#[test]
fn duplicate_device_names() {
    let text = "device \"a\" {\n  system = \"memory\"\n  size = \"1m\"\n}\n\ndevice a {\n  system = \"memory\"\n  size = \"1m\"\n}\n";
    let e = hcl_err(text, 6, "device \"a\"");
    assert!(
        matches!(
            e,
            SchemaError::DuplicateDevice {
                first_line: Some(1),
                ..
            }
        ),
        "{e}"
    );
    assert!(e.to_string().contains("line 1"));
}

#[test]
fn bad_durations() {
    let sync = |maxage: &str| {
        dev(&format!(
            "  system = \"memory\"\n  size = \"1g\"\n  blocksize = \"1m\"\n  sync {{\n    secure = false\n    accesskey = \"a\"\n    secretkey = \"b\"\n    endpoint = \"e:1\"\n    bucket = \"b\"\n    autostart = false\n    grabconcurrency = 4\n    config {{\n      onlydirty = false\n      blockshift = 2\n      maxage = {maxage}\n      minchanged = 1\n      checkperiod = \"1s\"\n      limit = 10\n      concurrency = 2\n    }}\n  }}\n"
        ))
    };
    // The template itself is fine with a good value.
    SiloSchema::parse_hcl(&sync("\"1m\""), "ok.conf").unwrap();
    for bad in ["\"10 parsecs\"", "\"10\"", "\"-1s\"", "\"\"", "5"] {
        let e = hcl_err(&sync(bad), 17, "device \"d\".sync.config.maxage");
        assert!(matches!(e, SchemaError::BadDuration { .. }), "{bad}: {e}");
    }
}

#[test]
fn unknown_attributes_and_blocks_are_errors() {
    let e = hcl_err(
        &dev("  system = \"memory\"\n  sise = \"1g\"\n"),
        4,
        "unknown attribute `sise`",
    );
    assert!(matches!(e, SchemaError::UnknownField { .. }));
    assert!(e.to_string().contains("expected one of"), "{e}");
    hcl_err(
        &dev("  system = \"memory\"\n  size = \"1g\"\n  mirgation {\n    anyorder = true\n  }\n"),
        5,
        "unknown block `mirgation`",
    );
    hcl_err(
        &dev("  system = \"memory\"\n  size = \"1g\"\n  migration {\n    anyorder = true\n    random = 1\n  }\n"),
        7,
        "device \"d\".migration: unknown attribute `random`",
    );
    hcl_err("\n\nfoo = 1\n", 3, "unknown attribute `foo`");
    hcl_err("disk \"x\" {\n}\n", 1, "unknown block `disk`");
    // A block name used as an attribute.
    hcl_err(
        &dev("  system = \"memory\"\n  size = \"1g\"\n  sync = 1\n"),
        5,
        "`sync`",
    );
}

#[test]
fn sync_block_size_inconsistencies() {
    let sync = |blocksize: &str, shift: u32| {
        dev(&format!(
            "  system = \"memory\"\n  size = \"1g\"\n{blocksize}  sync {{\n    secure = false\n    accesskey = \"a\"\n    secretkey = \"b\"\n    endpoint = \"e:1\"\n    bucket = \"b\"\n    autostart = false\n    grabconcurrency = 4\n    config {{\n      onlydirty = false\n      blockshift = {shift}\n      maxage = \"1s\"\n      minchanged = 1\n      checkperiod = \"1s\"\n      limit = 10\n      concurrency = 2\n    }}\n  }}\n"
        ))
    };
    let e = hcl_err(&sync("", 2), 5, "device \"d\".blocksize");
    assert!(matches!(e, SchemaError::SyncBlockSize { .. }), "{e}");
    let e = hcl_err(
        &sync("  blocksize = \"4k\"\n", 4),
        16,
        "device \"d\".sync.config.blockshift",
    );
    assert!(matches!(e, SchemaError::SyncBlockSize { .. }), "{e}");
    let e = hcl_err(&sync("  blocksize = \"4k\"\n", 200), 16, "blockshift");
    assert!(matches!(e, SchemaError::SyncBlockSize { .. }), "{e}");
    SiloSchema::parse_hcl(&sync("  blocksize = \"4k\"\n", 3), "ok").unwrap();
}

#[test]
fn missing_required_fields() {
    let e = hcl_err(
        &dev("  system = \"memory\"\n"),
        2,
        "missing required attribute `size`",
    );
    assert!(matches!(e, SchemaError::MissingField { .. }));
    hcl_err(
        &dev("  system = \"memory\"\n  size = \"1g\"\n  migration {\n  }\n"),
        5,
        "device \"d\".migration: missing required attribute `anyorder`",
    );
    hcl_err(
        &dev("  system = \"memory\"\n  size = \"1g\"\n  blocksize = \"1m\"\n  sync {\n    secure = false\n  }\n"),
        6,
        "device \"d\".sync: missing required attribute `accesskey`",
    );
}

#[test]
fn duplicate_attributes_and_blocks() {
    let e = hcl_err(
        &dev("  system = \"memory\"\n  size = \"1g\"\n  size = \"2g\"\n"),
        5,
        "size",
    );
    // hcl-edit itself refuses redefined attributes; the message quotes the line.
    assert!(
        matches!(
            e,
            SchemaError::DuplicateField { .. } | SchemaError::Syntax { .. }
        ),
        "{e}"
    );
    hcl_err(
        &dev("  system = \"memory\"\n  size = \"1g\"\n  migration {\n    anyorder = true\n  }\n  migration {\n    anyorder = false\n  }\n"),
        8,
        "device \"d\".migration",
    );
}

#[test]
fn wrong_types_and_expressions() {
    let e = hcl_err(
        &dev("  system = \"memory\"\n  size = \"1g\"\n  expose = 1\n"),
        5,
        "expose",
    );
    assert!(matches!(e, SchemaError::InvalidValue { .. }));
    hcl_err(
        &dev("  system = \"memory\"\n  size = \"1g\"\n  location = \"${var.dir}/x\"\n"),
        5,
        "template",
    );
    hcl_err(
        &dev("  system = memory\n  size = \"1g\"\n"),
        3,
        "expression",
    );
    hcl_err(
        &dev("  system = \"memory\"\n  size = [1]\n"),
        4,
        "unexpected `[`",
    );
    hcl_err(
        &dev("  system = \"memory\"\n  size = \"1g\"\n  pid = 1.5\n"),
        5,
        "pid",
    );
    hcl_err(
        &dev("  system = \"memory\"\n  size = \"1g\"\n  pid = 99999999999999999999\n"),
        5,
        "pid",
    );
}

#[test]
fn block_labels() {
    hcl_err(
        "\ndevice {\n  system = \"memory\"\n  size = \"1m\"\n}\n",
        2,
        "exactly one label",
    );
    hcl_err(
        "device \"a\" \"b\" {\n  system = \"memory\"\n  size = \"1m\"\n}\n",
        1,
        "exactly one label",
    );
    hcl_err(
        &dev("  system = \"memory\"\n  size = \"1g\"\n  migration \"x\" {\n    anyorder = true\n  }\n"),
        5,
        "takes no labels",
    );
}

#[test]
fn copy_on_write_chains() {
    // Base size must equal the overlay size.
    hcl_err(
        &dev("  system = \"memory\"\n  size = \"1g\"\n  source \"s\" {\n    system = \"memory\"\n    size = \"2g\"\n  }\n"),
        7,
        "device \"d\".source \"s\".size",
    );
    // Empty state-file label.
    hcl_err(
        &dev("  system = \"memory\"\n  size = \"1g\"\n  source \"\" {\n    system = \"memory\"\n    size = \"1g\"\n  }\n"),
        5,
        "must not be empty",
    );
    // Depth limit.
    let mut text = String::from("device d {\n");
    for i in 0..10 {
        text.push_str(&format!(
            "system = \"memory\"\nsize = \"1m\"\nsource \"s{i}\" {{\n"
        ));
    }
    text.push_str("system = \"memory\"\nsize = \"1m\"\n");
    text.push_str(&"}\n".repeat(11));
    let e = SiloSchema::parse_hcl(&text, "deep.conf").unwrap_err();
    assert!(e.to_string().contains("nested more than 8"), "{e}");
    assert_eq!(e.line(), Some(28), "{e}");
}

#[test]
fn syntax_errors_have_positions() {
    let e = hcl_err(
        "device \"x\" {\n  system = \"memory\"\n  size = \"1m\n}\n",
        3,
        "syntax error",
    );
    assert!(matches!(e, SchemaError::Syntax { .. }));
    hcl_err("device \"x\" {\n", 1, "syntax error");
}

#[test]
fn hostile_text_is_refused_before_parsing() {
    let deep = format!("device x {{\n{}\n}}", "a {".repeat(100_000));
    let e = SiloSchema::parse_hcl(&deep, "deep").unwrap_err();
    assert!(matches!(e, SchemaError::TooComplex { .. }), "{e}");
    assert_eq!(e.line(), Some(2), "{e}");
    let huge = "#".repeat(2 << 20);
    for f in [Format::Hcl, Format::Toml, Format::Json] {
        assert!(matches!(
            SiloSchema::parse(&huge, "huge", f).unwrap_err(),
            SchemaError::TooComplex { .. }
        ));
    }
}

/// `hcl-edit` parses expressions recursively: without the lexical
/// allow-list these would exhaust the stack and abort the process.
#[test]
fn expressions_never_reach_the_recursive_parser() {
    let n = 100_000;
    for expr in [
        format!("1{}", "+1".repeat(n)),
        format!("1{}", "-1".repeat(n)),
        format!("-1{}", " -1".repeat(n)),
        format!("1{}", "e+1".repeat(n)),
        format!("{}1", "true ? 1 : ".repeat(n / 10)),
        format!("a{}", ".b".repeat(n)),
        format!("a{}", "[0]".repeat(n)),
        format!("{}1", "(".repeat(n)),
        format!("{}1", "- ".repeat(n)),
        format!("{}1", "!".repeat(n)),
        format!("\"{}\"", "${".repeat(n)),
        format!("<<EOF\n{}\nEOF", "${".repeat(n)),
    ] {
        let text = format!("device x {{\n  size = {expr}\n}}\n");
        let e = SiloSchema::parse_hcl(&text, "expr.conf").unwrap_err();
        assert!(
            matches!(
                e,
                SchemaError::Syntax { .. } | SchemaError::TooComplex { .. }
            ),
            "{e}"
        );
        assert_eq!(e.line(), Some(2), "{e}");
    }
}

#[test]
fn other_literal_limits() {
    hcl_err(
        &dev("  system = \"memory\"\n  size = \"1g\"\n  blocksize = \"1m\"\n  writecache {\n    minsize = \"2m\"\n    maxsize = \"1m\"\n    flushperiod = \"1s\"\n  }\n"),
        7,
        "device \"d\".writecache.minsize",
    );
    hcl_err(
        &dev("  system = \"memory\"\n  size = \"1g\"\n  writecache {\n    minsize = \"0\"\n    maxsize = \"1m\"\n    flushperiod = \"0s\"\n  }\n"),
        8,
        "device \"d\".writecache.flushperiod",
    );
}

// ----- TOML and JSON errors -------------------------------------------------------

#[test]
fn toml_errors_have_lines_and_fields() {
    let e = SiloSchema::parse_toml(
        "[[device]]\nname = \"a\"\nsystem = \"memory\"\nsize = \"12x\"\n",
        "bad.toml",
    )
    .unwrap_err();
    assert_eq!(e.line(), Some(4), "{e}");
    assert!(e.to_string().contains("12x"), "{e}");
    let e = SiloSchema::parse_toml(
        "[[device]]\nname = \"a\"\nsystem = \"memory\"\nsize = \"1g\"\nbogus = 1\n",
        "bad.toml",
    )
    .unwrap_err();
    assert!(e.to_string().contains("bogus"), "{e}");
    let e = SiloSchema::parse_toml(
        "[[device]]\nname = \"a\"\nsystem = \"memory\"\nsize = \"1g\"\nblocksize = \"3000\"\n",
        "bad.toml",
    )
    .unwrap_err();
    assert!(matches!(e, SchemaError::BadBlockSize { .. }), "{e}");
    assert_eq!(e.line(), Some(5), "{e}");
    assert!(e.to_string().starts_with("bad.toml:5:"), "{e}");
    assert!(e.to_string().contains("device \"a\".blocksize"), "{e}");
    let e = SiloSchema::parse_toml(
        "[[device]]\nname = \"a\"\nsystem = \"memory\"\nsize = \"1g\"\n\n[[device]]\nname = \"a\"\nsystem = \"memory\"\nsize = \"1g\"\n",
        "dup.toml",
    )
    .unwrap_err();
    assert!(
        matches!(
            e,
            SchemaError::DuplicateDevice {
                first_line: Some(2),
                ..
            }
        ),
        "{e}"
    );
    assert_eq!(e.line(), Some(7), "{e}");
}

#[test]
fn json_errors_have_lines_and_fields() {
    let e = SiloSchema::parse_json(
        "{\"device\": [\n {\"name\": \"a\",\n  \"system\": \"tape\",\n  \"size\": 1}\n]}",
        "bad.json",
    )
    .unwrap_err();
    assert_eq!(e.line(), Some(3), "{e}");
    assert!(e.to_string().contains("tape"), "{e}");
    let e = SiloSchema::parse_json(
        "{\"device\": [\n {\"name\": \"a\",\n  \"system\": \"file\",\n  \"size\": 1}\n]}",
        "bad.json",
    )
    .unwrap_err();
    assert!(matches!(e, SchemaError::MissingLocation { .. }), "{e}");
    assert_eq!(e.line(), Some(3), "{e}");
    assert!(e.to_string().contains("device \"a\".location"), "{e}");
}
