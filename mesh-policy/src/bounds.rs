//! Bounds on policy text, checked before the YAML is deserialized.
//!
//! serde_yaml (libyaml underneath) first collects every event of a document in memory and only
//! then checks its recursion limit while building values, and its alias check ("repetition
//! limit": alias expansions up to 100 times the document's event count) grows with the
//! document, so a few MiB of `[[[[...` or a "billion laughs" of nested aliases cost gigabytes
//! before any error. This pass streams the same text through a pure-Rust event parser
//! (`saphyr-parser`) in constant memory per nesting level and refuses, at the first event past
//! a limit:
//!
//! * text larger than [`MAX_POLICY_BYTES`];
//! * collections nested deeper than [`MAX_YAML_DEPTH`];
//! * more than [`MAX_YAML_NODES`] nodes, or more than [`MAX_YAML_SCALAR_BYTES`] of scalar text,
//!   once every alias is replaced by what it stands for (aliases may therefore at most double
//!   a policy's text);
//! * an alias inside the node it refers to (a cycle).
//!
//! A syntax error here is reported as the YAML error it is: the text is refused whichever
//! parser finds the fault first.

use std::collections::HashMap;

use saphyr_parser::{Event, Parser};

/// Largest policy text, and the most a policy file, or all the files of a policy directory
/// together, may hold. A policy for thousands of Services with their EndpointSlices fits in a
/// few MiB; a file of tens of MiB is a mistake or an attack.
pub const MAX_POLICY_BYTES: usize = 4 * 1024 * 1024;
/// Deepest nesting of YAML collections. Policy objects nest about ten levels
/// (`spec.rules[].matches[].headers[].value`); serde_yaml's own recursion limit is 128.
pub const MAX_YAML_DEPTH: usize = 64;
/// Most YAML nodes (scalars and collections) in one text after alias expansion: about twice
/// what [`MAX_POLICY_BYTES`] of real policy holds, and a few hundred MiB of parsed values at
/// worst.
pub const MAX_YAML_NODES: u64 = 1_000_000;
/// Most scalar bytes in one text after alias expansion.
pub const MAX_YAML_SCALAR_BYTES: u64 = 2 * MAX_POLICY_BYTES as u64;

/// Why a text was refused, with its 1-based line where one applies.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Refusal {
    /// 1-based document index in the text.
    pub document: usize,
    pub reason: String,
}

/// Size of a node once its aliases are expanded.
#[derive(Debug, Clone, Copy, Default)]
struct Size {
    nodes: u64,
    bytes: u64,
}

impl Size {
    fn add(&mut self, other: Size) {
        self.nodes = self.nodes.saturating_add(other.nodes);
        self.bytes = self.bytes.saturating_add(other.bytes);
    }
}

/// An open collection.
#[derive(Debug)]
struct Open {
    anchor: usize,
    size: Size,
}

/// Checks `text` against the limits above.
pub(crate) fn check(text: &str) -> Result<(), Refusal> {
    let mut document = 0usize;
    let refuse = |document: usize, reason: String| Refusal {
        document: document.max(1),
        reason,
    };
    if text.len() > MAX_POLICY_BYTES {
        return Err(refuse(
            1,
            format!(
                "the text is {} bytes, over the limit of {MAX_POLICY_BYTES} bytes",
                text.len()
            ),
        ));
    }
    let mut open: Vec<Open> = Vec::new();
    let mut anchors: HashMap<usize, Size> = HashMap::new();
    let mut total = Size::default();
    for event in Parser::new_from_str(text) {
        let (event, span) = match event {
            Ok(event) => event,
            // The scanner reads flow collections ahead of the events and has its own limit
            // (255 levels): the same refusal as ours.
            Err(error) if error.info() == "recursion limit exceeded" => {
                return Err(refuse(
                    document,
                    format!(
                        "line {}: collections nested deeper than {MAX_YAML_DEPTH}",
                        error.marker().line()
                    ),
                ));
            }
            Err(error) => return Err(refuse(document, format!("not valid YAML: {error}"))),
        };
        let line = span.start.line();
        let node = match event {
            Event::DocumentStart(_) => {
                document += 1;
                continue;
            }
            Event::SequenceStart(anchor, _) | Event::MappingStart(anchor, _) => {
                if open.len() >= MAX_YAML_DEPTH {
                    return Err(refuse(
                        document,
                        format!("line {line}: collections nested deeper than {MAX_YAML_DEPTH}"),
                    ));
                }
                open.push(Open {
                    anchor,
                    size: Size { nodes: 1, bytes: 0 },
                });
                total.add(Size { nodes: 1, bytes: 0 });
                None
            }
            Event::SequenceEnd | Event::MappingEnd => {
                let Some(closed) = open.pop() else {
                    continue;
                };
                if closed.anchor != 0 {
                    anchors.insert(closed.anchor, closed.size);
                }
                Some(closed.size)
            }
            Event::Scalar(value, _, anchor, _) => {
                let size = Size {
                    nodes: 1,
                    bytes: value.len() as u64,
                };
                if anchor != 0 {
                    anchors.insert(anchor, size);
                }
                total.add(size);
                Some(size)
            }
            Event::Alias(anchor) => {
                if open.iter().any(|o| o.anchor == anchor) {
                    return Err(refuse(
                        document,
                        format!("line {line}: an alias inside the node it refers to"),
                    ));
                }
                let size = anchors.get(&anchor).copied().unwrap_or_default();
                // The expansion is part of the parent's size too, so nested aliases multiply
                // here exactly as they would in the parsed values.
                total.add(size);
                Some(size)
            }
            Event::Nothing | Event::StreamStart | Event::StreamEnd | Event::DocumentEnd => {
                continue;
            }
        };
        if let (Some(size), Some(parent)) = (node, open.last_mut()) {
            parent.size.add(size);
        }
        if total.nodes > MAX_YAML_NODES {
            return Err(refuse(
                document,
                format!(
                    "line {line}: more than {MAX_YAML_NODES} YAML nodes once aliases are \
                     expanded"
                ),
            ));
        }
        if total.bytes > MAX_YAML_SCALAR_BYTES {
            return Err(refuse(
                document,
                format!(
                    "line {line}: more than {MAX_YAML_SCALAR_BYTES} bytes of scalars once \
                     aliases are expanded"
                ),
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "test code: a panic is a failed test")]
    use super::*;
    use std::time::{Duration, Instant};

    fn refused(text: &str) -> String {
        let start = Instant::now();
        let result = check(text);
        assert!(
            start.elapsed() < Duration::from_secs(2),
            "took {:?}",
            start.elapsed()
        );
        match result {
            Err(refusal) => refusal.reason,
            Ok(()) => panic!("accepted: {}", &text[..text.len().min(200)]),
        }
    }

    /// The classic: nine levels of ten aliases each, 10^9 strings once expanded.
    pub(crate) fn billion_laughs() -> String {
        let mut text = String::from("a0: &a0 [\"lol\"]\n");
        for level in 1..10 {
            let refs = vec![format!("*a{}", level - 1); 10].join(", ");
            text.push_str(&format!("a{level}: &a{level} [{refs}]\n"));
        }
        text
    }

    #[test]
    fn ordinary_policies_and_modest_aliases_pass() {
        check("a: 1\n---\nb: [1, 2, {c: d}]\n").unwrap();
        check("base: &m {path: {type: PathPrefix, value: /}}\nuse: [*m, *m, *m]\n").unwrap();
        check("").unwrap();
    }

    #[test]
    fn alias_bombs_are_refused() {
        let reason = refused(&billion_laughs());
        assert!(reason.contains("once aliases are expanded"), "{reason}");
        // Few nodes, but a long scalar repeated.
        let long = "x".repeat(1024 * 1024);
        let text = format!("a: &a \"{long}\"\nb: [*a, *a, *a, *a, *a, *a, *a, *a, *a]\n");
        let reason = refused(&text);
        assert!(reason.contains("bytes of scalars"), "{reason}");
    }

    #[test]
    fn deep_nesting_is_refused_in_flow_and_block_style() {
        let flow = "[".repeat(100_000);
        let reason = refused(&flow);
        assert!(reason.contains("nested deeper than 64"), "{reason}");
        let mut block = String::new();
        for depth in 0..70 {
            block.push_str(&format!("{}k{depth}:\n", " ".repeat(depth)));
        }
        let reason = refused(&block);
        assert!(reason.contains("nested deeper than 64"), "{reason}");
        // 64 levels are fine.
        let ok = format!("{}{}", "[".repeat(64), "]".repeat(64));
        check(&ok).unwrap();
    }

    #[test]
    fn oversized_text_is_refused_before_parsing() {
        let text = "#".repeat(MAX_POLICY_BYTES + 1);
        let reason = refused(&text);
        assert!(reason.contains("over the limit"), "{reason}");
    }

    #[test]
    fn a_recursive_alias_is_refused() {
        // libyaml accepts the anchor before its node ends; the expansion would never end.
        let reason = refused("a: &a [1, *a]\n");
        assert!(reason.contains("inside the node it refers to"), "{reason}");
    }

    #[test]
    fn syntax_errors_name_the_document() {
        let refusal = check("a: 1\n---\nb: [\n").unwrap_err();
        assert_eq!(refusal.document, 2);
        assert!(refusal.reason.starts_with("not valid YAML"), "{refusal:?}");
    }
}
