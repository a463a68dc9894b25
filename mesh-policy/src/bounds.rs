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
//! * a flow collection of more than [`MAX_FLOW_COLLECTION_BYTES`] (found by a lexical pass
//!   first: the event parser would buffer all of it);
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
/// Longest flow collection (`[...]`, `{...}`) that starts in block context. The event parser
/// holds every token of such a collection until it ends (it might be a mapping key), at about
/// 180 bytes of memory per byte of text: a 4 MiB one-line list would cost 700 MiB. Policy files
/// use short flow collections; a Kubernetes object passed as one line of JSON is a flow mapping
/// too, and stays far below this.
pub const MAX_FLOW_COLLECTION_BYTES: usize = 256 * 1024;

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
    if let Some((line, len)) = longest_flow_collection(text, MAX_FLOW_COLLECTION_BYTES) {
        return Err(refuse(
            1,
            format!(
                "line {line}: a flow collection ([...] or {{...}}) of more than \
                 {MAX_FLOW_COLLECTION_BYTES} bytes ({len} so far)"
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

/// Finds a flow collection that starts in block context and runs past `limit` bytes: its
/// 1-based line and length up to where the scan stopped. A lexical pass, deliberately simple:
/// it follows quotes, comments and bracket depth, treats a bracket as a collection start only
/// where a node can start (line start, after `- `, `: ` or `? `), and skips block scalars by
/// indentation. Where it misreads (a quote inside a plain scalar), it can only make a collection
/// look longer than it is, never let a long one through.
fn longest_flow_collection(text: &str, limit: usize) -> Option<(usize, usize)> {
    let bytes = text.as_bytes();
    let mut i = 0;
    let mut line = 1;
    // Indentation of the line that opened a block scalar, while inside it.
    let mut block_scalar: Option<usize> = None;
    while i < bytes.len() {
        // At a line start: indentation, then what the line holds.
        let start = i;
        while bytes.get(i) == Some(&b' ') {
            i += 1;
        }
        let indent = i - start;
        let blank = matches!(bytes.get(i), None | Some(b'\n' | b'\r' | b'#'));
        if let Some(parent) = block_scalar {
            if blank || indent > parent {
                i = next_line(bytes, i);
                line += 1;
                continue;
            }
            block_scalar = None;
        }
        // Walk the line's tokens in block context.
        let mut at_node_start = true;
        while let Some(&b) = bytes.get(i) {
            match b {
                b'\n' => break,
                b'#' if i == start || matches!(bytes.get(i - 1), Some(b' ' | b'\t')) => {
                    i = next_line(bytes, i) - 1;
                }
                b'[' | b'{' if at_node_start => {
                    let (end, lines) = flow_end(bytes, i, limit);
                    if end - i > limit {
                        return Some((line, end - i));
                    }
                    line += lines;
                    i = end;
                    at_node_start = false;
                    continue;
                }
                b'"' | b'\'' if at_node_start => {
                    let (end, lines) = quoted_end(bytes, i);
                    line += lines;
                    i = end;
                    at_node_start = false;
                    continue;
                }
                b'|' | b'>' if at_node_start => {
                    block_scalar = Some(indent);
                    at_node_start = false;
                }
                b' ' | b'\t' => {}
                b'-' | b':' | b'?'
                    if matches!(bytes.get(i + 1), None | Some(b' ' | b'\n' | b'\r')) =>
                {
                    at_node_start = true;
                }
                _ => at_node_start = false,
            }
            i += 1;
        }
        i = next_line(bytes, i);
        line += 1;
    }
    None
}

/// The index after the next line end.
fn next_line(bytes: &[u8], from: usize) -> usize {
    bytes
        .get(from..)
        .and_then(|rest| rest.iter().position(|&b| b == b'\n'))
        .map_or(bytes.len(), |n| from + n + 1)
}

/// The end (exclusive) of the quoted scalar starting at `from`, and the line ends inside it.
fn quoted_end(bytes: &[u8], from: usize) -> (usize, usize) {
    let quote = bytes.get(from).copied().unwrap_or(b'"');
    let mut i = from + 1;
    let mut lines = 0;
    while let Some(&b) = bytes.get(i) {
        match b {
            b'\\' if quote == b'"' => i += 1,
            b'\'' if quote == b'\'' && bytes.get(i + 1) == Some(&b'\'') => i += 1,
            b'\n' => lines += 1,
            _ if b == quote => return (i + 1, lines),
            _ => {}
        }
        i += 1;
    }
    (bytes.len(), lines)
}

/// The end (exclusive) of the flow collection starting at `from`, or where the scan passed
/// `limit`; and the line ends inside.
fn flow_end(bytes: &[u8], from: usize, limit: usize) -> (usize, usize) {
    let mut depth = 0usize;
    let mut i = from;
    let mut lines = 0;
    let mut token_start = true;
    while let Some(&b) = bytes.get(i) {
        if i - from > limit {
            return (i, lines);
        }
        match b {
            b'[' | b'{' => {
                depth += 1;
                token_start = true;
            }
            b']' | b'}' => {
                depth = depth.saturating_sub(1);
                if depth == 0 {
                    return (i + 1, lines);
                }
                token_start = false;
            }
            b'"' | b'\'' if token_start => {
                let (end, inside) = quoted_end(bytes, i);
                lines += inside;
                i = end;
                token_start = false;
                continue;
            }
            b'#' if matches!(bytes.get(i.wrapping_sub(1)), Some(b' ' | b'\t' | b'\n')) => {
                i = next_line(bytes, i);
                lines += 1;
                token_start = true;
                continue;
            }
            b'\n' => {
                lines += 1;
                token_start = true;
            }
            b',' | b':' | b'?' | b' ' | b'\t' | b'\r' => token_start = true,
            _ => token_start = false,
        }
        i += 1;
    }
    (bytes.len(), lines)
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
    fn long_flow_collections_are_refused_without_parsing() {
        let start = Instant::now();
        let list = format!("[{}1]", "1,".repeat(MAX_FLOW_COLLECTION_BYTES));
        let reason = refused(&list);
        assert!(reason.contains("flow collection"), "{reason}");
        let value = format!(
            "a:\n  b: {{k: [{}1]}}\n",
            "1, ".repeat(MAX_FLOW_COLLECTION_BYTES / 2)
        );
        let reason = refused(&value);
        assert!(reason.starts_with("line 2: a flow collection"), "{reason}");
        assert!(
            start.elapsed() < Duration::from_millis(500),
            "{:?}",
            start.elapsed()
        );
        // Brackets inside quotes, comments and block scalars are text, and long text is fine.
        let long = "x".repeat(MAX_FLOW_COLLECTION_BYTES * 2);
        for text in [
            format!("a: \"[{long}\"\n"),
            format!("a: '[{long}'\n"),
            format!("# [{long}\na: 1\n"),
            format!("a: |\n  [{long}\n  more\nb: [1, 2]\n"),
            format!("a: [\"]\", '[', 2]\nb: {long}\n"),
            format!("a: plain [ text {long}\n"),
        ] {
            assert_eq!(
                longest_flow_collection(&text, MAX_FLOW_COLLECTION_BYTES),
                None
            );
            check(&text).unwrap();
        }
        // A large policy in many small flow collections passes.
        let many = "- {name: a, port: 80}\n".repeat(50_000);
        check(&many).unwrap();
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
