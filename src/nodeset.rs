//! Nodesets as ClusterShell's `cluset` reads and prints them: `cn[001-010,12]`, `@group`, `, ! & ^`.
//!
//! A node name is split into text and digit groups: `cn12-ib3` has the pattern
//! `cn%-ib%` and the index vector `(12, 3)`. A set is an ordered set of such
//! (pattern, vector) pairs. Counts are computed from the bracket syntax before
//! anything is expanded, so `n[0-99999999999]` is refused without allocating.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use crate::names::MAX_NAME;

/// The default limit on how many names one nodeset may hold.
pub const DEFAULT_LIMIT: usize = 100_000;

/// Longest digit group accepted in a name (u64 holds 19 digits).
const MAX_DIGITS: usize = 18;

/// Why a nodeset was refused; the message is written for a person.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NodeSetError {
    #[error("nodeset syntax: {0}")]
    Syntax(String),
    #[error("nodeset too large: {count} names, the limit is {limit}")]
    TooLarge { count: u128, limit: usize },
    #[error("unknown group @{0}")]
    UnknownGroup(String),
}

/// A number in a name, with its zero padding: `007` is (7, 3), `7` is (7, 0).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Index {
    pub value: u64,
    pub pad: u8,
}

impl Index {
    fn parse(digits: &str) -> Result<Index, NodeSetError> {
        if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
            return Err(NodeSetError::Syntax(format!("'{digits}' is not a number")));
        }
        if digits.len() > MAX_DIGITS {
            return Err(NodeSetError::Syntax(format!("'{digits}' has too many digits")));
        }
        let value = digits.parse().map_err(|_| NodeSetError::Syntax(format!("'{digits}' is not a number")))?;
        let pad =
            if digits.len() > 1 && digits.starts_with('0') { u8::try_from(digits.len()).unwrap_or(u8::MAX) } else { 0 };
        Ok(Index { value, pad })
    }

    fn digits(value: u64) -> usize {
        value.checked_ilog10().map_or(1, |l| l as usize + 1)
    }

    /// `value` printed at least `pad` wide; the pad is kept only where it adds a leading zero.
    fn padded(value: u64, pad: u8) -> Index {
        let pad = if pad as usize > Index::digits(value) { pad } else { 0 };
        Index { value, pad }
    }

    /// Whether this index prints the same when the run's padding is `pad`.
    fn fits_pad(self, pad: u8) -> bool {
        self.pad == pad || (self.pad == 0 && Index::digits(self.value) >= pad as usize)
    }
}

impl fmt::Display for Index {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:0width$}", self.value, width = self.pad as usize)
    }
}

/// Text around the digit groups of a name: `cn%-ib%` is stored as ["cn", "-ib", ""].
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
struct Pattern(Vec<String>);

impl Pattern {
    fn dims(&self) -> usize {
        self.0.len() - 1
    }

    fn render(&self, parts: &[String]) -> String {
        let mut out = self.0[0].clone();
        for (part, text) in parts.iter().zip(&self.0[1..]) {
            out.push_str(part);
            out.push_str(text);
        }
        out
    }
}

/// An ordered set of node names.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NodeSet {
    nodes: BTreeMap<Pattern, BTreeSet<Vec<Index>>>,
    len: usize,
}

/// Resolves `@name` to the nodeset text of that group.
pub trait Groups {
    fn group(&self, name: &str) -> Option<String>;
}

/// No groups at all.
#[derive(Debug, Clone, Copy)]
pub struct NoGroups;

impl Groups for NoGroups {
    fn group(&self, _: &str) -> Option<String> {
        None
    }
}

impl<F: Fn(&str) -> Option<String>> Groups for F {
    fn group(&self, name: &str) -> Option<String> {
        self(name)
    }
}

impl NodeSet {
    pub fn new() -> NodeSet {
        NodeSet::default()
    }

    /// Parses `text` with no groups and the default limit.
    pub fn parse(text: &str) -> Result<NodeSet, NodeSetError> {
        NodeSet::parse_with(text, &NoGroups, DEFAULT_LIMIT)
    }

    /// Parses `text`, resolving `@group` through `groups`, refusing more than `limit` names.
    pub fn parse_with(text: &str, groups: &dyn Groups, limit: usize) -> Result<NodeSet, NodeSetError> {
        Parser { groups, limit, depth: 0 }.expr(text)
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Adds one plain node name (no brackets); false when it was there already.
    pub fn insert(&mut self, name: &str) -> Result<bool, NodeSetError> {
        let (pattern, vector) = split_name(name)?;
        let added = self.nodes.entry(pattern).or_default().insert(vector);
        self.len += usize::from(added);
        Ok(added)
    }

    pub fn contains(&self, name: &str) -> bool {
        split_name(name).is_ok_and(|(p, v)| self.nodes.get(&p).is_some_and(|s| s.contains(&v)))
    }

    /// The names in order: by pattern, then by index.
    pub fn iter(&self) -> impl Iterator<Item = String> + '_ {
        self.nodes.iter().flat_map(|(pattern, vectors)| {
            vectors.iter().map(move |v| {
                let parts: Vec<String> = v.iter().map(Index::to_string).collect();
                pattern.render(&parts)
            })
        })
    }

    pub fn union(&mut self, other: &NodeSet) {
        for (p, vs) in &other.nodes {
            let mine = self.nodes.entry(p.clone()).or_default();
            for v in vs {
                self.len += usize::from(mine.insert(v.clone()));
            }
        }
    }

    pub fn difference(&mut self, other: &NodeSet) {
        self.retain(|p, v| !other.has(p, v));
    }

    pub fn intersection(&mut self, other: &NodeSet) {
        self.retain(|p, v| other.has(p, v));
    }

    pub fn symmetric_difference(&mut self, other: &NodeSet) {
        let common = {
            let mut c = self.clone();
            c.intersection(other);
            c
        };
        self.union(other);
        self.difference(&common);
    }

    fn has(&self, p: &Pattern, v: &Vec<Index>) -> bool {
        self.nodes.get(p).is_some_and(|s| s.contains(v))
    }

    fn retain(&mut self, mut keep: impl FnMut(&Pattern, &Vec<Index>) -> bool) {
        let mut len = 0;
        self.nodes.retain(|p, vs| {
            vs.retain(|v| keep(p, v));
            len += vs.len();
            !vs.is_empty()
        });
        self.len = len;
    }

    /// The folded form `cluset -f` prints, without a newline.
    pub fn fold(&self) -> String {
        let mut out = Vec::new();
        for (pattern, vectors) in &self.nodes {
            match pattern.dims() {
                0 => out.push(pattern.render(&[])),
                1 => {
                    let ranges = fold_ranges(vectors.iter().map(|v| v[0]));
                    out.push(pattern.render(&[ranges.bracketed()]));
                }
                _ => {
                    for tuple in fold_nd(vectors) {
                        let parts: Vec<String> = tuple.iter().map(Folded::bracketed).collect();
                        out.push(pattern.render(&parts));
                    }
                }
            }
        }
        out.join(",")
    }
}

impl fmt::Display for NodeSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.fold())
    }
}

/// Splits a plain node name into its pattern and index vector.
fn split_name(name: &str) -> Result<(Pattern, Vec<Index>), NodeSetError> {
    check_text(name)?;
    if name.is_empty() {
        return Err(NodeSetError::Syntax("empty node name".into()));
    }
    check_len(name.len())?;
    let mut texts = vec![String::new()];
    let mut vector = Vec::new();
    let bytes = name.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i].is_ascii_digit() {
            let start = i;
            while i < bytes.len() && bytes[i].is_ascii_digit() {
                i += 1;
            }
            vector.push(Index::parse(&name[start..i])?);
            texts.push(String::new());
        } else {
            texts.last_mut().expect("texts starts non-empty").push(bytes[i] as char);
            i += 1;
        }
    }
    Ok((Pattern(texts), vector))
}

/// A node name is at most [`MAX_NAME`] characters, as every node name in the tree.
fn check_len(len: usize) -> Result<(), NodeSetError> {
    if len > MAX_NAME {
        return Err(NodeSetError::Syntax(format!("node names are at most {MAX_NAME} characters (one has {len})")));
    }
    Ok(())
}

/// Node names hold letters, digits, `.`, `_` and `-`.
fn check_text(text: &str) -> Result<(), NodeSetError> {
    match text.chars().find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))) {
        Some(c) => Err(NodeSetError::Syntax(format!("character {c:?} is not allowed in a node name"))),
        None => Ok(()),
    }
}

/// A folded list of indexes: runs `(first, last)` sharing one padding.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct Folded(Vec<(Index, Index)>);

impl Folded {
    fn count(&self) -> usize {
        self.0.iter().map(|(a, b)| (b.value - a.value) as usize + 1).sum()
    }

    fn bracketed(&self) -> String {
        let body: Vec<String> =
            self.0.iter().map(|(a, b)| if a == b { a.to_string() } else { format!("{a}-{b}") }).collect();
        if self.count() == 1 { body.join(",") } else { format!("[{}]", body.join(",")) }
    }
}

/// Folds sorted indexes into runs of consecutive values with compatible padding.
fn fold_ranges(indexes: impl Iterator<Item = Index>) -> Folded {
    let mut sorted: Vec<Index> = indexes.collect();
    sorted.sort_by_key(|i| (i.value, i.pad));
    let mut runs: Vec<(Index, Index)> = Vec::new();
    for idx in sorted {
        if let Some((first, last)) = runs.last_mut() {
            if last.value + 1 == idx.value && idx.fits_pad(first.pad) {
                *last = idx;
                continue;
            }
        }
        runs.push((idx, idx));
    }
    Folded(runs)
}

/// Folds index vectors of two or more dimensions, merging vectors that differ in one dimension.
fn fold_nd(vectors: &BTreeSet<Vec<Index>>) -> Vec<Vec<Folded>> {
    let dims = vectors.first().map_or(0, Vec::len);
    let mut tuples: Vec<Vec<BTreeSet<Index>>> =
        vectors.iter().map(|v| v.iter().map(|i| BTreeSet::from([*i])).collect()).collect();
    // Merge along the last dimension first, then earlier ones, until nothing changes.
    loop {
        let before = tuples.len();
        for d in (0..dims).rev() {
            let mut merged: BTreeMap<Vec<Vec<Index>>, BTreeSet<Index>> = BTreeMap::new();
            let mut order = Vec::new();
            for t in tuples.drain(..) {
                let key: Vec<Vec<Index>> = t
                    .iter()
                    .enumerate()
                    .map(|(i, s)| if i == d { Vec::new() } else { s.iter().copied().collect() })
                    .collect();
                if !merged.contains_key(&key) {
                    order.push(key.clone());
                }
                merged.entry(key).or_default().extend(t[d].iter().copied());
            }
            for key in order {
                let set = merged.remove(&key).expect("every key was inserted");
                let t = key
                    .into_iter()
                    .enumerate()
                    .map(|(i, s)| if i == d { set.clone() } else { s.into_iter().collect() })
                    .collect();
                tuples.push(t);
            }
        }
        if tuples.len() == before {
            break;
        }
    }
    let mut out: Vec<Vec<Folded>> =
        tuples.into_iter().map(|t| t.into_iter().map(|s| fold_ranges(s.into_iter())).collect()).collect();
    out.sort();
    out
}

/// Recursive-descent parser for nodeset expressions.
struct Parser<'a> {
    groups: &'a dyn Groups,
    limit: usize,
    depth: usize,
}

impl Parser<'_> {
    fn expr(&mut self, text: &str) -> Result<NodeSet, NodeSetError> {
        let mut result = NodeSet::new();
        let mut op = ',';
        for (token, next_op) in split_top(text)? {
            let term = self.term(token)?;
            match op {
                ',' => {
                    let total = result.len as u128 + term.len as u128;
                    if total > self.limit as u128 {
                        return Err(NodeSetError::TooLarge { count: total, limit: self.limit });
                    }
                    result.union(&term)
                }
                '!' => result.difference(&term),
                '&' => result.intersection(&term),
                '^' => {
                    result.symmetric_difference(&term);
                    if result.len > self.limit {
                        return Err(NodeSetError::TooLarge { count: result.len as u128, limit: self.limit });
                    }
                }
                _ => unreachable!("split_top yields only , ! & ^"),
            }
            op = next_op;
        }
        Ok(result)
    }

    fn term(&mut self, token: &str) -> Result<NodeSet, NodeSetError> {
        if let Some(name) = token.strip_prefix('@') {
            if self.depth >= 8 {
                return Err(NodeSetError::Syntax(format!("group @{name} nests too deeply")));
            }
            let text = self.groups.group(name).ok_or_else(|| NodeSetError::UnknownGroup(name.to_string()))?;
            self.depth += 1;
            let set = self.expr(&text);
            self.depth -= 1;
            return set;
        }
        expand_term(token, self.limit)
    }
}

/// Splits at top-level operators (outside brackets); whitespace separates like a comma.
fn split_top(text: &str) -> Result<Vec<(&str, char)>, NodeSetError> {
    let mut out = Vec::new();
    let mut depth = 0usize;
    let mut start = 0;
    for (i, c) in text.char_indices() {
        match c {
            '[' => depth += 1,
            ']' => depth = depth.checked_sub(1).ok_or_else(|| NodeSetError::Syntax("']' without '['".into()))?,
            ',' | '!' | '&' | '^' | ' ' | '\t' | '\n' if depth == 0 => {
                let op = if c.is_whitespace() { ',' } else { c };
                push_token(&mut out, &text[start..i], op)?;
                start = i + c.len_utf8();
            }
            _ => {}
        }
    }
    if depth != 0 {
        return Err(NodeSetError::Syntax("'[' without ']'".into()));
    }
    push_token(&mut out, &text[start..], ',')?;
    Ok(out)
}

fn push_token<'t>(out: &mut Vec<(&'t str, char)>, token: &'t str, op: char) -> Result<(), NodeSetError> {
    if token.is_empty() {
        // Empty pieces between separators are allowed for ',' (as cluset does), not before an operator.
        if op != ',' {
            return Err(NodeSetError::Syntax(format!("operator '{op}' needs a nodeset on its left")));
        }
        if let Some(last) = out.last_mut() {
            if last.1 != ',' {
                return Err(NodeSetError::Syntax(format!("operator '{}' needs a nodeset on its right", last.1)));
            }
        }
        return Ok(());
    }
    out.push((token, op));
    Ok(())
}

/// Expands one bracketed name like `cn[1-3]-ib[0-1]` after checking its size.
fn expand_term(token: &str, limit: usize) -> Result<NodeSet, NodeSetError> {
    // Pieces: literal text and bracket groups. Digits right before a '[' prefix each index.
    let mut texts = vec![String::new()];
    let mut dims: Vec<Vec<Index>> = Vec::new();
    let mut count: u128 = 1;
    let mut rest = token;
    while !rest.is_empty() {
        if let Some(open) = rest.find('[') {
            let close = rest[open..]
                .find(']')
                .map(|c| c + open)
                .ok_or_else(|| NodeSetError::Syntax("'[' without ']'".into()))?;
            let before = &rest[..open];
            // Digits just before the bracket belong to each index of the range.
            let digits_at = before.trim_end_matches(|c: char| c.is_ascii_digit()).len();
            push_literal(&mut texts, &mut dims, &before[..digits_at], &mut count)?;
            let prefix = &before[digits_at..];
            let range = parse_range(&rest[open + 1..close], prefix, limit)?;
            count = count.saturating_mul(range.len() as u128);
            if count > limit as u128 {
                return Err(NodeSetError::TooLarge { count, limit });
            }
            dims.push(range);
            texts.push(String::new());
            rest = &rest[close + 1..];
        } else {
            push_literal(&mut texts, &mut dims, rest, &mut count)?;
            rest = "";
        }
    }
    if texts.iter().all(String::is_empty) && dims.is_empty() {
        return Err(NodeSetError::Syntax("empty node name".into()));
    }
    let longest: usize = texts.iter().map(String::len).sum::<usize>()
        + dims.iter().map(|d| d.iter().map(|i| i.to_string().len()).max().unwrap_or(0)).sum::<usize>();
    check_len(longest)?;
    let pattern = Pattern(texts);
    let mut set = NodeSet::new();
    // Two numeric groups with no text between them (`a[0-1]0`, `a[1-2][3-4]`) print as one
    // number: such names are stored as their plain spelling splits, so each name has one form.
    if dims.len() > 1 && pattern.0[1..dims.len()].iter().any(String::is_empty) {
        let mut vector = vec![Index { value: 0, pad: 0 }; dims.len()];
        let mut failed = None;
        cartesian(&dims, 0, &mut vector, &mut |v| {
            let parts: Vec<String> = v.iter().map(Index::to_string).collect();
            if let Err(e) = set.insert(&pattern.render(&parts)) {
                failed = Some(e);
            }
        });
        return match failed {
            Some(e) => Err(e),
            None => Ok(set),
        };
    }
    let entry = set.nodes.entry(pattern).or_default();
    let mut vector = vec![Index { value: 0, pad: 0 }; dims.len()];
    cartesian(&dims, 0, &mut vector, &mut |v| {
        entry.insert(v.to_vec());
    });
    set.len = entry.len();
    if set.len == 0 {
        set.nodes.clear();
    }
    Ok(set)
}

fn cartesian(dims: &[Vec<Index>], d: usize, v: &mut Vec<Index>, f: &mut impl FnMut(&[Index])) {
    if d == dims.len() {
        f(v);
        return;
    }
    for idx in &dims[d] {
        v[d] = *idx;
        cartesian(dims, d + 1, v, f);
    }
}

/// Appends literal text, turning each digit group in it into a one-value dimension.
fn push_literal(
    texts: &mut Vec<String>,
    dims: &mut Vec<Vec<Index>>,
    literal: &str,
    count: &mut u128,
) -> Result<(), NodeSetError> {
    if literal.is_empty() {
        return Ok(());
    }
    let (pattern, vector) = split_name(literal)?;
    let mut parts = pattern.0.into_iter();
    texts.last_mut().expect("texts starts non-empty").push_str(&parts.next().unwrap_or_default());
    for (idx, text) in vector.into_iter().zip(parts) {
        dims.push(vec![idx]);
        texts.push(text);
    }
    *count = (*count).max(1);
    Ok(())
}

/// Parses `1-10/2,15,020-025` into indexes, each prefixed by `prefix` digits.
fn parse_range(body: &str, prefix: &str, limit: usize) -> Result<Vec<Index>, NodeSetError> {
    if body.is_empty() {
        return Err(NodeSetError::Syntax("empty brackets".into()));
    }
    let mut items: Vec<(Index, Index, u64)> = Vec::new();
    let mut count: u128 = 0;
    for item in body.split(',') {
        let (span, step) = match item.split_once('/') {
            Some((span, step)) => {
                let step: u64 = step
                    .parse()
                    .ok()
                    .filter(|s| *s > 0)
                    .ok_or_else(|| NodeSetError::Syntax(format!("bad step in '{item}'")))?;
                (span, step)
            }
            None => (item, 1),
        };
        let (a, b) = match span.split_once('-') {
            Some((a, b)) => (Index::parse(a)?, Index::parse(b)?),
            None if step == 1 => {
                let a = Index::parse(span)?;
                (a, a)
            }
            None => return Err(NodeSetError::Syntax(format!("a step needs a range in '{item}'"))),
        };
        if a.value > b.value {
            return Err(NodeSetError::Syntax(format!("range '{span}' goes backwards")));
        }
        count += u128::from((b.value - a.value) / step + 1);
        if count > limit as u128 {
            return Err(NodeSetError::TooLarge { count, limit });
        }
        items.push((a, b, step));
    }
    let mut out = BTreeSet::new();
    for (a, b, step) in items {
        let pad = a.pad;
        let mut v = a.value;
        while v <= b.value {
            let idx = Index::padded(v, pad);
            let idx = if prefix.is_empty() { idx } else { Index::parse(&format!("{prefix}{idx}"))? };
            out.insert(idx);
            v = match v.checked_add(step) {
                Some(n) => n,
                None => break,
            };
        }
    }
    Ok(out.into_iter().collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fold(s: &str) -> String {
        NodeSet::parse(s).unwrap().fold()
    }

    #[test]
    fn folds_like_cluset() {
        assert_eq!(fold("cn1,cn2,cn3,cn5"), "cn[1-3,5]");
        assert_eq!(fold("cn[001-010]"), "cn[001-010]");
        assert_eq!(fold("cn5"), "cn5");
        assert_eq!(fold("login"), "login");
        assert_eq!(fold("cn[0-3,5-9]"), "cn[0-3,5-9]");
        assert_eq!(fold("cn09,cn10"), "cn[09-10]");
        assert_eq!(fold("cn[1-2]-ib[0-1]"), "cn[1-2]-ib[0-1]");
        assert_eq!(fold("cn1[0-2]"), "cn[10-12]");
        assert_eq!(fold("cn[1-10/3]"), "cn[1,4,7,10]");
    }

    #[test]
    fn operators_left_to_right() {
        assert_eq!(fold("cn[1-10]!cn5"), "cn[1-4,6-10]");
        assert_eq!(fold("cn[1-10]&cn[5-20]"), "cn[5-10]");
        assert_eq!(fold("cn[1-5]^cn[4-8]"), "cn[1-3,6-8]");
        assert_eq!(fold("cn[1-5],cn[7-8]!cn3"), "cn[1-2,4-5,7-8]");
    }

    #[test]
    fn groups_resolve() {
        let g = |n: &str| (n == "compute").then(|| "cn[1-4]".to_string());
        let s = NodeSet::parse_with("@compute,cn9", &g, DEFAULT_LIMIT).unwrap();
        assert_eq!(s.fold(), "cn[1-4,9]");
        assert_eq!(NodeSet::parse_with("@nope", &g, DEFAULT_LIMIT), Err(NodeSetError::UnknownGroup("nope".into())));
    }

    #[test]
    fn bombs_are_refused_before_allocation() {
        assert!(matches!(NodeSet::parse("n[0-99999999999]"), Err(NodeSetError::TooLarge { .. })));
        assert!(matches!(NodeSet::parse("n[0-999][0-999]"), Err(NodeSetError::TooLarge { .. })));
        assert!(matches!(NodeSet::parse("n[0-9999999999999999999999]"), Err(NodeSetError::Syntax(_))));
    }

    #[test]
    fn bad_syntax_is_refused() {
        let long = "n".repeat(64);
        for bad in ["cn[", "cn]", "cn[]", "cn[5-1]", "a/b", "cn[1-x]", "cn 1!", "!cn1", "cn[1-4/0]", "a b\0", &long] {
            assert!(NodeSet::parse(bad).is_err(), "{bad:?} should be refused");
        }
    }

    #[test]
    fn iter_expands_in_order() {
        let s = NodeSet::parse("cn[2,10,1]").unwrap();
        assert_eq!(s.iter().collect::<Vec<_>>(), ["cn1", "cn2", "cn10"]);
        assert_eq!(s.len(), 3);
        assert!(s.contains("cn10"));
    }
}

#[cfg(test)]
mod properties {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn any_text_parses_or_errs(text in "\\PC{0,40}") {
            let _ = NodeSet::parse_with(&text, &NoGroups, 1000);
        }

        #[test]
        fn nodeset_syntax_round_trips(text in "([a-c]{1,2}(\\[[0-9]{1,2}(-[0-9]{1,3})?(,[0-9]{1,3})*\\])?[0-9]{0,3}[,!&^]?){1,4}") {
            if let Ok(set) = NodeSet::parse_with(&text, &NoGroups, 10_000) {
                let folded = set.fold();
                let again = NodeSet::parse_with(&folded, &NoGroups, 10_000).expect("folded sets reparse");
                prop_assert_eq!(&again, &set, "{} folded to {}", text, folded);
                prop_assert_eq!(again.len(), set.iter().count());
            }
        }
    }
}
