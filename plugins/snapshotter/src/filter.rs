//! containerd's filter language, as much of it as List needs: a request carries alternatives
//! (any may match), each a comma-separated conjunction of `field==value`, `field!=value` or a
//! bare `field` (present). Fields: `name`, `parent`, `kind`, `labels.KEY`; keys and values may be
//! double-quoted. containerd re-checks what a snapshotter returns, so an operator we do not know
//! (`~=`) matches everything rather than hiding a snapshot.

use std::collections::BTreeMap;

/// What a filter sees of a snapshot.
#[derive(Debug)]
pub struct Subject<'a> {
    /// Name (key).
    pub name: &'a str,
    /// Parent.
    pub parent: &'a str,
    /// `view`, `active` or `committed`.
    pub kind: &'a str,
    /// Labels.
    pub labels: &'a BTreeMap<String, String>,
}

#[derive(Debug, PartialEq)]
enum Op {
    Eq,
    Ne,
    Present,
    Any,
}

#[derive(Debug)]
struct Term {
    field: Vec<String>,
    op: Op,
    value: String,
}

/// True when `subject` matches any of `filters` (or there are none).
pub fn matches(filters: &[String], subject: &Subject<'_>) -> bool {
    let filters: Vec<&String> = filters.iter().filter(|f| !f.trim().is_empty()).collect();
    filters.is_empty()
        || filters
            .iter()
            .any(|f| split_terms(f).iter().all(|t| term_matches(t, subject)))
}

fn term_matches(term: &Term, s: &Subject<'_>) -> bool {
    let actual: Option<&str> = match term.field.first().map(String::as_str) {
        Some("name") => Some(s.name),
        Some("parent") => Some(s.parent),
        Some("kind") => Some(s.kind),
        Some("labels") => {
            let key = term.field[1..].join(".");
            s.labels.get(&key).map(String::as_str)
        }
        _ => None,
    };
    match term.op {
        Op::Eq => actual == Some(term.value.as_str()),
        Op::Ne => actual != Some(term.value.as_str()),
        Op::Present => actual.is_some(),
        Op::Any => true,
    }
}

/// Splits at top-level commas and parses each term.
fn split_terms(filter: &str) -> Vec<Term> {
    let mut parts = Vec::new();
    let mut current = String::new();
    let mut quoted = false;
    let mut escaped = false;
    for c in filter.chars() {
        if escaped {
            current.push(c);
            escaped = false;
            continue;
        }
        match c {
            '\\' if quoted => {
                current.push(c);
                escaped = true;
            }
            '"' => {
                quoted = !quoted;
                current.push(c);
            }
            ',' if !quoted => parts.push(std::mem::take(&mut current)),
            _ => current.push(c),
        }
    }
    parts.push(current);
    parts.iter().filter_map(|p| parse_term(p.trim())).collect()
}

fn parse_term(text: &str) -> Option<Term> {
    if text.is_empty() {
        return None;
    }
    let (field_text, op, value_text) = find_op(text);
    Some(Term {
        field: split_field(field_text),
        op,
        value: unquote(value_text.trim()),
    })
}

/// Finds the first operator outside quotes.
fn find_op(text: &str) -> (&str, Op, &str) {
    let bytes = text.as_bytes();
    let mut quoted = false;
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'\\' if quoted => i += 1,
            b'"' => quoted = !quoted,
            b'=' | b'!' | b'~' if !quoted && bytes.get(i + 1) == Some(&b'=') => {
                let op = match bytes[i] {
                    b'=' => Op::Eq,
                    b'!' => Op::Ne,
                    _ => Op::Any,
                };
                return (&text[..i], op, &text[i + 2..]);
            }
            _ => {}
        }
        i += 1;
    }
    (text, Op::Present, "")
}

fn split_field(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut current = String::new();
    let mut quoted = false;
    let mut chars = text.trim().chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' if quoted => {
                if let Some(n) = chars.next() {
                    current.push(n);
                }
            }
            '"' => quoted = !quoted,
            '.' if !quoted => out.push(std::mem::take(&mut current)),
            _ => current.push(c),
        }
    }
    out.push(current);
    out
}

fn unquote(text: &str) -> String {
    if text.len() >= 2 && text.starts_with('"') && text.ends_with('"') {
        let inner = &text[1..text.len() - 1];
        let mut out = String::new();
        let mut chars = inner.chars();
        while let Some(c) = chars.next() {
            if c == '\\' {
                if let Some(n) = chars.next() {
                    out.push(n);
                }
            } else {
                out.push(c);
            }
        }
        out
    } else {
        text.to_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn subject<'a>(labels: &'a BTreeMap<String, String>, parent: &'a str) -> Subject<'a> {
        Subject {
            name: "sha256:c2",
            parent,
            kind: "committed",
            labels,
        }
    }

    #[test]
    fn containerds_remote_snapshot_filter_matches_only_the_right_snapshot() {
        let mut labels = BTreeMap::new();
        labels.insert(
            "containerd.io/snapshot.ref".to_owned(),
            "sha256:c2".to_owned(),
        );
        let filter = vec![
            "labels.\"containerd.io/snapshot.ref\"==sha256:c2,parent==\"sha256:c1\"".to_owned(),
        ];
        assert!(matches(&filter, &subject(&labels, "sha256:c1")));
        assert!(!matches(&filter, &subject(&labels, "")));
        let empty_parent =
            vec!["labels.\"containerd.io/snapshot.ref\"==sha256:c2,parent==\"\"".to_owned()];
        assert!(matches(&empty_parent, &subject(&labels, "")));
    }

    #[test]
    fn alternatives_presence_negation_and_unknown_operators() {
        let mut labels = BTreeMap::new();
        labels.insert("a".to_owned(), "1".to_owned());
        let s = subject(&labels, "");
        assert!(matches(&[], &s));
        assert!(matches(
            &["kind==view".to_owned(), "kind==committed".to_owned()],
            &s
        ));
        assert!(!matches(&["kind==view".to_owned()], &s));
        assert!(matches(&["labels.a".to_owned()], &s));
        assert!(!matches(&["labels.b".to_owned()], &s));
        assert!(matches(&["name!=other".to_owned()], &s));
        assert!(matches(&["name~=^sha".to_owned()], &s));
    }
}
