//! A step's changes to its run's state, as the step log keeps them
//! (`wardcall.run_steps.patch`, migration 0017).
//!
//! A patch is a JSON array of operations applied in order:
//! `{"set": [key, …], "value": v}` creates or replaces the object member at
//! that path (`[]`: the whole state), `{"remove": [key, …]}` removes it.
//! Paths only descend through objects (an array is replaced whole), so each
//! operation is one `jsonb_set` or `#-` in SQL (`wardcall.apply_state_patch`),
//! and applying a patch to the state it was made from gives the state after
//! the step, JSON nulls included. [`diff_from`] makes only `set`s: an object
//! that lost a member is set whole.
//!
//! The state before a step is not kept to make the patch: a worker keeps its
//! [`Snapshot`] (its objects' keys and an exact encoding of every other
//! value, in three flat buffers), which the walk that makes one step's patch
//! also makes for the next step. A step costs one walk of its state, copying
//! its keys and values' bytes once, and no copy of the tree: a copy, its drop
//! and a comparison took about a third of the engine's CPU in `bench steps`,
//! and 128-bit keyed hashes per member about as much (BENCHMARKS.md, "Issue 9,
//! fourteenth session"); writing every value as JSON text (its strings
//! escaped) and testing each object's key order took two fifths of it
//! ("fifteenth session"). Only the values a step changed are written as JSON,
//! into its patch.

use serde_json::{json, Map, Value};
use std::ops::Range;

/// A state as [`diff_from`] compares it, in pre-order (the root first):
/// per object, its members' keys and count; per other value, its encoding
/// ([`Snapshot::push_leaf`]). Objects are compared member by member (their
/// keys in order: a `serde_json::Map` iterates them sorted), any other value
/// by its encoding.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    keys: String,
    leaves: Vec<u8>,
    nodes: Vec<Node>,
}

#[derive(Debug, Clone)]
struct Node {
    /// The member's key in `keys` (empty for the root).
    key: Range<usize>,
    kind: Kind,
}

#[derive(Debug, Clone)]
enum Kind {
    /// An object with `members` members, whose nodes end before `end`.
    Object { members: usize, end: usize },
    /// Any other value, its encoding in `leaves`.
    Leaf(Range<usize>),
}

impl Snapshot {
    /// The snapshot of `state` (one walk of it).
    pub fn of(state: &Value) -> Snapshot {
        let mut snap = Snapshot::default();
        snap.record("", state);
        snap
    }

    fn record(&mut self, key: &str, v: &Value) {
        let at = self.push_key(key);
        match v {
            Value::Object(o) => {
                self.nodes.push(Node { key: at, kind: Kind::Object { members: o.len(), end: 0 } });
                let me = self.nodes.len() - 1;
                for (k, e) in o {
                    self.record(k, e);
                }
                self.close(me);
            }
            other => {
                let leaf = self.push_leaf(other);
                self.nodes.push(Node { key: at, kind: Kind::Leaf(leaf) });
            }
        }
    }

    fn push_key(&mut self, key: &str) -> Range<usize> {
        let start = self.keys.len();
        self.keys.push_str(key);
        start..self.keys.len()
    }

    /// Appends the encoding of a value that is not an object: a tag byte,
    /// then `null`, `true`, `false` nothing more; an integer its 8 bytes
    /// (`u64` or `i64`, as `serde_json` holds it); any other number its
    /// shortest exact text (with `serde_json`'s `arbitrary_precision`, the
    /// literal as written); a string its UTF-8 bytes, unescaped; an array its
    /// JSON text. Two values with the same encoding (their ranges' lengths
    /// included) are equal, and equal values have the same encoding, but for
    /// `-0.0`, written as `0.0`: what the merge needs, without escaping
    /// every string.
    fn push_leaf(&mut self, v: &Value) -> Range<usize> {
        let start = self.leaves.len();
        match v {
            Value::Null => self.leaves.push(b'n'),
            Value::Bool(true) => self.leaves.push(b't'),
            Value::Bool(false) => self.leaves.push(b'f'),
            Value::Number(n) => match (n.as_u64(), n.as_i64()) {
                (Some(u), _) => {
                    self.leaves.push(b'u');
                    self.leaves.extend_from_slice(&u.to_le_bytes());
                }
                (None, Some(i)) => {
                    self.leaves.push(b'i');
                    self.leaves.extend_from_slice(&i.to_le_bytes());
                }
                (None, None) => {
                    self.leaves.push(b'd');
                    let text = n.to_string();
                    self.leaves.extend_from_slice(if text == "-0.0" { b"0.0" } else { text.as_bytes() });
                }
            },
            Value::String(text) => {
                self.leaves.push(b's');
                self.leaves.extend_from_slice(text.as_bytes());
            }
            Value::Array(_) | Value::Object(_) => {
                self.leaves.push(b'j');
                // Writing a `Value` to a `Vec` cannot fail.
                let _ = serde_json::to_writer(&mut self.leaves, v);
            }
        }
        start..self.leaves.len()
    }

    fn close(&mut self, object: usize) {
        let end = self.nodes.len();
        if let Kind::Object { end: e, .. } = &mut self.nodes[object].kind {
            *e = end;
        }
    }

    fn key(&self, node: usize) -> &str {
        &self.keys[self.nodes[node].key.clone()]
    }

    /// The node after `node`'s subtree.
    fn after(&self, node: usize) -> usize {
        match self.nodes[node].kind {
            Kind::Object { end, .. } => end,
            Kind::Leaf(_) => node + 1,
        }
    }
}

/// The operations that turn the state `before` was taken of into `after`
/// (an empty array when they are equal), and the snapshot of `after`, in
/// one walk of `after`. An object present in both is compared member by
/// member; a member that is new or changed (and is not an object present in
/// both) is one `set`; an object that lost a member is one `set` of the
/// whole object.
pub fn diff_from(before: &Snapshot, after: &Value) -> (Value, Snapshot) {
    diff_reusing(before, after, Snapshot::default())
}

/// [`diff_from`], making the next snapshot in the buffers of `spare` (an
/// older snapshot, whatever it held): a worker's steps then reuse two sets
/// of buffers instead of allocating three of the state's size per step.
pub fn diff_reusing(before: &Snapshot, after: &Value, spare: Snapshot) -> (Value, Snapshot) {
    let mut ops = Vec::new();
    let mut next = spare;
    next.keys.clear();
    next.leaves.clear();
    next.nodes.clear();
    next.keys.reserve(before.keys.len() + 16);
    next.leaves.reserve(before.leaves.len() + 256);
    next.nodes.reserve(before.nodes.len() + 4);
    let mut path = Vec::new();
    let root = (!before.nodes.is_empty()).then_some(0);
    walk(before, root, "", after, &mut path, &mut ops, &mut next);
    (Value::Array(ops), next)
}

/// The operations that turn `before` into `after` ([`diff_from`] with the
/// snapshot of `before`).
pub fn diff(before: &Value, after: &Value) -> Value {
    diff_from(&Snapshot::of(before), after).0
}

#[allow(clippy::too_many_arguments)]
fn walk<'a>(before: &Snapshot, was: Option<usize>, key: &str, after: &'a Value, path: &mut Vec<&'a str>, ops: &mut Vec<Value>, next: &mut Snapshot) {
    let at = next.push_key(key);
    match (was.map(|i| (i, &before.nodes[i].kind)), after) {
        (Some((i, Kind::Object { members, end })), Value::Object(o)) => {
            next.nodes.push(Node { key: at, kind: Kind::Object { members: o.len(), end: 0 } });
            let me = next.nodes.len() - 1;
            let mark = ops.len();
            // Both member lists in key order: a merge. A member of `before`
            // passed over is one that `after` lost. (Were the keys ever out
            // of order, which a `serde_json::Map` never gives, members would
            // be passed over and the object set whole: larger, still exact.)
            let mut old = i + 1;
            let mut kept = 0;
            for (k, v) in o {
                let k = k.as_str();
                // Most members are where they were: equality is tested first.
                let mut same = None;
                while old < *end {
                    let was = before.key(old);
                    if was == k {
                        same = Some(old);
                        break;
                    }
                    if was > k {
                        break;
                    }
                    old = before.after(old);
                }
                if let Some(s) = same {
                    kept += 1;
                    old = before.after(s);
                }
                path.push(k);
                walk(before, same, k, v, path, ops, next);
                path.pop();
            }
            next.close(me);
            if kept < *members {
                // A member is gone: the object is set whole, instead of its
                // members' operations.
                ops.truncate(mark);
                ops.push(json!({"set": path, "value": after}));
            }
        }
        (Some((_, Kind::Leaf(leaf))), v) if !v.is_object() => {
            let now = next.push_leaf(v);
            if before.leaves[leaf.clone()] != next.leaves[now.clone()] {
                ops.push(json!({"set": path, "value": v}));
            }
            next.nodes.push(Node { key: at, kind: Kind::Leaf(now) });
        }
        (_, v) => {
            ops.push(json!({"set": path, "value": v}));
            // Recorded whole (its key is already pushed: record the value
            // under an empty key, then give the node its key back).
            let first = next.nodes.len();
            next.record("", v);
            next.nodes[first].key = at;
        }
    }
}

/// Sets the member at `path` of `state` to `value`, creating or replacing
/// the objects on the way (`[]`: the whole state), and returns the one
/// operation that makes the same change when applied to `state` as it was
/// ([`apply`], SQL `wardcall.apply_state_patch`): a `set` at the deepest
/// prefix of `path` that already leads through objects, its value the rest
/// of `path` nested around `value` (a parent that is missing or is not an
/// object is set whole, since a patch never sets through one). What a step
/// that records its changes ([`crate::runtime::step::StepContext::record_set`])
/// logs instead of a diff.
pub fn set_member(state: &mut Value, path: &[&str], value: Value) -> Value {
    let nest = |keys: &[&str], value: Value| {
        keys.iter().rev().fold(value, |inner, key| {
            let mut m = Map::new();
            m.insert(key.to_string(), inner);
            Value::Object(m)
        })
    };
    if path.is_empty() {
        *state = value.clone();
        return json!({"set": [], "value": value});
    }
    if !state.is_object() {
        let whole = nest(path, value);
        *state = whole.clone();
        return json!({"set": [], "value": whole});
    }
    // `path[..depth]` leads through objects; `path[depth]` is set.
    let mut depth = 0;
    let mut node = &*state;
    while depth + 1 < path.len() {
        match node.get(path[depth]) {
            Some(child) if child.is_object() => {
                node = child;
                depth += 1;
            }
            _ => break,
        }
    }
    let value = if depth + 1 < path.len() { nest(&path[depth + 1..], value) } else { value };
    let mut parent = &mut *state;
    for key in &path[..depth] {
        parent = parent.get_mut(*key).expect("a prefix found above");
    }
    if let Some(members) = parent.as_object_mut() {
        members.insert(path[depth].to_string(), value.clone());
    }
    json!({"set": &path[..=depth], "value": value})
}

/// Applies `patch` (as [`diff`] makes it) to `state`, as
/// `wardcall.apply_state_patch` does in SQL: an operation that is malformed
/// (a `set` without a value, a path that is not an array of keys) or whose
/// path does not lead through objects is skipped.
pub fn apply(state: &mut Value, patch: &Value) {
    for op in patch.as_array().map(Vec::as_slice).unwrap_or_default() {
        let set = op.get("set").and_then(Value::as_array);
        let remove = op.get("remove").and_then(Value::as_array);
        if set.into_iter().chain(remove).flatten().any(|key| !key.is_string()) {
            continue;
        }
        if let (Some(path), Some(value)) = (set, op.get("value")) {
            match path.split_last() {
                None => *state = value.clone(),
                Some((last, parents)) => {
                    if let (Some(parent), Some(key)) = (object_at(state, parents), last.as_str()) {
                        parent.insert(key.to_string(), value.clone());
                    }
                }
            }
        } else if let Some((last, parents)) = remove.and_then(|p| p.split_last()) {
            if let (Some(parent), Some(key)) = (object_at(state, parents), last.as_str()) {
                parent.remove(key);
            }
        }
    }
}

fn object_at<'a>(state: &'a mut Value, path: &[Value]) -> Option<&'a mut Map<String, Value>> {
    let mut at = state;
    for key in path {
        at = at.as_object_mut()?.get_mut(key.as_str()?)?;
    }
    at.as_object_mut()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn round_trip(before: Value, after: Value) -> Value {
        let patch = diff(&before, &after);
        let mut state = before;
        apply(&mut state, &patch);
        assert_eq!(state, after);
        patch
    }

    #[test]
    fn an_added_result_is_one_set() {
        let patch = round_trip(json!({"results": {"0": {"a": 1}}}), json!({"results": {"0": {"a": 1}, "1": {"b": null}}}));
        assert_eq!(patch, json!([{"set": ["results", "1"], "value": {"b": null}}]));
    }

    #[test]
    fn a_changed_member_deep_down_is_one_set() {
        let patch = round_trip(json!({"a": {"b": {"c": 1, "d": 2}}, "e": 3}), json!({"a": {"b": {"c": 1, "d": 5}}, "e": 3}));
        assert_eq!(patch, json!([{"set": ["a", "b", "d"], "value": 5}]));
    }

    #[test]
    fn equal_states_give_an_empty_patch() {
        assert_eq!(round_trip(json!({"a": [1, 2], "b": {"c": null}}), json!({"a": [1, 2], "b": {"c": null}})), json!([]));
        assert_eq!(round_trip(json!(null), json!(null)), json!([]));
    }

    #[test]
    fn an_object_that_lost_a_member_is_set_whole() {
        let patch = round_trip(json!({"a": {"b": 1, "c": 2}, "d": 1}), json!({"a": {"b": 1}, "d": 2}));
        assert_eq!(patch, json!([{"set": ["a"], "value": {"b": 1}}, {"set": ["d"], "value": 2}]));
        round_trip(json!({"cycle": 0}), json!({}));
    }

    #[test]
    fn nulls_arrays_and_type_changes() {
        round_trip(json!({"a": 1, "b": {"c": 2, "d": 3}, "e": [1, 2]}), json!({"b": {"c": null}, "e": [2], "f": {"g": []}}));
        round_trip(json!({"a": {"b": 1}}), json!({"a": "text"}));
        round_trip(json!({"a": "text"}), json!({"a": {"b": 1}}));
        round_trip(json!({"a": [{"b": 1}]}), json!({"a": [{"b": 2}]}));
        round_trip(json!({"a": 1}), json!({"a": 1.0}));
        round_trip(json!({"a": "1"}), json!({"a": 1}));
    }

    #[test]
    fn two_values_share_an_encoding_only_when_equal() {
        let values = [
            json!(null),
            json!(true),
            json!(false),
            json!(0),
            json!(1),
            json!(-1),
            json!(u64::MAX),
            json!(i64::MIN),
            json!(1.0),
            json!(0.0),
            json!(-0.0),
            json!(1e300),
            json!(1.0000000000000002),
            json!(0.5),
            json!(""),
            json!("n"),
            json!("t"),
            json!("1"),
            json!("[1]"),
            json!("a\"b"),
            json!("a\\\"b"),
            json!("é\u{0}"),
            json!([]),
            json!([1]),
            json!(["1"]),
            json!([{"a": null}]),
            json!([{"a": "null"}]),
        ];
        for a in &values {
            for b in &values {
                let (mut x, mut y) = (Snapshot::default(), Snapshot::default());
                let (ra, rb) = (x.push_leaf(a), y.push_leaf(b));
                assert_eq!(x.leaves[ra] == y.leaves[rb], a == b, "{a} / {b}");
                round_trip(json!({"k": a}), json!({"k": b}));
            }
        }
    }

    #[test]
    fn a_recorded_set_replays_as_it_was_made() {
        let cases: Vec<(Value, Vec<&str>, Value, Value)> = vec![
            (json!({"results": {"0": 1}}), vec!["results", "1"], json!({"a": 2}), json!({"set": ["results", "1"], "value": {"a": 2}})),
            (json!({}), vec!["results", "0"], json!(1), json!({"set": ["results"], "value": {"0": 1}})),
            (json!({"results": "text"}), vec!["results", "0", "x"], json!(1), json!({"set": ["results"], "value": {"0": {"x": 1}}})),
            (json!(null), vec!["results", "0"], json!(1), json!({"set": [], "value": {"results": {"0": 1}}})),
            (json!([1]), vec![], json!({}), json!({"set": [], "value": {}})),
            (json!({"a": {"b": 1}}), vec!["a"], json!(null), json!({"set": ["a"], "value": null})),
        ];
        for (before, path, value, want) in cases {
            let mut state = before.clone();
            let op = set_member(&mut state, &path, value);
            assert_eq!(op, want, "{before} {path:?}");
            let mut replay = before.clone();
            apply(&mut replay, &json!([op]));
            assert_eq!(replay, state, "{before} {path:?}");
        }
    }

    #[test]
    fn a_state_that_is_not_an_object_is_replaced_whole() {
        let patch = round_trip(json!({}), json!([1, 2]));
        assert_eq!(patch, json!([{"set": [], "value": [1, 2]}]));
        round_trip(Value::Null, json!({"cycle": 0}));
    }

    #[test]
    fn keys_are_taken_literally() {
        round_trip(json!({"a/b": {"~0": 1}, "{x,y}": 2}), json!({"a/b": {"~0": 2}, "{x,y}": 3, "": 4}));
        // Same bytes, split differently between key and value.
        round_trip(json!({"ab": {"c": 1}}), json!({"a": {"bc": 1}}));
    }

    #[test]
    fn the_next_snapshot_is_the_afters() {
        let states = [
            json!({}),
            json!({"results": {"0": 1}}),
            json!({"results": {"0": 1, "1": [2]}}),
            json!({"results": {"1": [3]}, "x": null}),
            json!({"results": {"1": [3], "2": {"a": {"b": null}}}, "x": null}),
            json!({"results": {"1": [3], "2": {"a": {"b": 1}}}}),
            json!("text"),
            json!({"a": 1}),
        ];
        let mut snap = Snapshot::of(&states[0]);
        // The buffers of an unrelated, larger snapshot, reused from the start.
        let mut spare = Snapshot::of(&json!({"z": {"y": [1, 2, 3], "x": "a long text to leave behind"}, "a": null}));
        for pair in states.windows(2) {
            let (patch, next) = diff_reusing(&snap, &pair[1], spare);
            let mut state = pair[0].clone();
            apply(&mut state, &patch);
            assert_eq!(state, pair[1], "{patch}");
            let fresh = Snapshot::of(&pair[1]);
            assert_eq!((&next.keys, &next.leaves), (&fresh.keys, &fresh.leaves));
            assert_eq!(format!("{:?}", next.nodes), format!("{:?}", fresh.nodes));
            spare = std::mem::replace(&mut snap, next);
        }
    }

    #[test]
    fn a_map_iterates_its_keys_in_order() {
        // The merge in `walk` relies on it (a `serde_json::Map` without the
        // `preserve_order` feature is a `BTreeMap`); out of order, objects
        // would be set whole, still correct but larger.
        let v = json!({"b": 1, "a": 2, "c": 3, "B": 4});
        let keys: Vec<&String> = v.as_object().unwrap().keys().collect();
        let mut sorted = keys.clone();
        sorted.sort();
        assert_eq!(keys, sorted);
    }
}
