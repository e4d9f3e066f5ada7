//! `silo demo`: exits 0, reports equal hashes, draws a well-formed timeline.

mod common;

use common::*;

/// A minimal XML well-formedness check: tags balance and nest, the root is
/// `<svg>`. Returns the element names seen.
fn check_xml(text: &str) -> Vec<String> {
    let mut stack: Vec<String> = Vec::new();
    let mut seen = Vec::new();
    let mut rest = text;
    while let Some(i) = rest.find('<') {
        rest = &rest[i + 1..];
        let end = rest.find('>').expect("unterminated tag");
        let tag = &rest[..end];
        rest = &rest[end + 1..];
        if tag.starts_with('?') || tag.starts_with('!') {
            continue;
        }
        if let Some(name) = tag.strip_prefix('/') {
            let open = stack.pop().expect("closing tag without an open one");
            assert_eq!(open, name.trim(), "mis-nested </{name}>");
            continue;
        }
        let name = tag
            .trim_end_matches('/')
            .split_whitespace()
            .next()
            .expect("empty tag")
            .to_string();
        assert_eq!(
            tag.matches('"').count() % 2,
            0,
            "unbalanced quotes in <{tag}>"
        );
        if stack.is_empty() {
            assert_eq!(name, "svg", "the root element must be <svg>");
            assert!(seen.is_empty(), "a second root element");
        }
        seen.push(name.clone());
        if !tag.ends_with('/') {
            stack.push(name);
        }
    }
    assert!(stack.is_empty(), "unclosed elements: {stack:?}");
    assert!(!seen.is_empty(), "no element");
    seen
}

#[test]
fn demo_reports_equal_hashes_and_draws_a_timeline() {
    let dir = tempfile::tempdir().unwrap();
    let svg = dir.path().join("timeline.svg");
    let o = silo()
        .args([
            "demo",
            "--memory-size",
            "16m",
            "--file-size",
            "8m",
            "--block-size",
            "64k",
            "--timeline",
        ])
        .arg(&svg)
        .output()
        .unwrap();
    let out = String::from_utf8_lossy(&o.stdout);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "demo failed:\n{out}\n{err}");
    assert!(out.contains("hashes: all equal"), "{out}");
    assert!(!out.contains("DIFFERENT"), "{out}");
    // Every device got a hash line, each equal.
    for dev in ["memory", "disk"] {
        let line = out
            .lines()
            .find(|l| l.trim_start().starts_with(dev) && l.contains("source"))
            .unwrap_or_else(|| panic!("no hash line for {dev}:\n{out}"));
        assert!(line.ends_with("equal"), "{line}");
        let hashes: Vec<&str> = line
            .split_whitespace()
            .filter(|w| w.ends_with('…'))
            .collect();
        assert_eq!(hashes.len(), 2, "{line}");
        assert_eq!(hashes[0], hashes[1], "{line}");
    }
    assert!(out.contains("authority transferred: yes"), "{out}");
    assert!(out.contains("dirty rounds:"), "{out}");
    assert!(out.contains("cut-over:"), "{out}");

    let text = std::fs::read_to_string(&svg).expect("timeline written");
    let elements = check_xml(&text);
    assert!(elements.iter().filter(|e| *e == "rect").count() > 10);
    // Marks of every kind: bulk, priority (destination reads) and dirty.
    for (kind, colour) in [
        ("bulk", "#4c78a8"),
        ("priority", "#e45756"),
        ("dirty", "#f2a900"),
    ] {
        let marks = text
            .lines()
            // Marks are 2 px wide (the legend's swatches are 10 px).
            .filter(|l| {
                l.starts_with("<rect")
                    && l.contains("width=\"2\"")
                    && l.contains(&format!("fill=\"{colour}\""))
            })
            .count();
        assert!(
            marks > 0,
            "no {kind} marks in the timeline; demo said:\n{out}"
        );
    }
}

#[test]
fn demo_refuses_a_bad_block_size() {
    let o = silo()
        .args(["demo", "--block-size", "3000"])
        .output()
        .unwrap();
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(err.lines().count(), 1, "{err}");
}

#[test]
fn json_logs_go_to_stderr_one_object_per_line() {
    let o = silo()
        .args([
            "--log-format",
            "json",
            "--log-level",
            "info",
            "demo",
            "--memory-size",
            "2m",
            "--file-size",
            "1m",
            "--block-size",
            "64k",
        ])
        .output()
        .unwrap();
    assert!(o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.lines().count() >= 2, "{err}");
    for l in err.lines() {
        assert!(
            l.starts_with("{\"timestamp\":") && l.ends_with('}'),
            "not JSON: {l}"
        );
    }
    // Results stay on stdout.
    assert!(String::from_utf8_lossy(&o.stdout).contains("hashes: all equal"));
}
