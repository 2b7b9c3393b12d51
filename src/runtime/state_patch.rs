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
//! [`Fingerprint`] (a 128-bit keyed hash per object member, by path), which
//! the walk that makes one step's patch also makes for the next step. A
//! step costs one walk of its state and no copy of it (a copy, its drop and
//! a comparison took about a third of the engine's CPU in `bench steps`,
//! BENCHMARKS.md, "Issue 9, fourteenth session").

use serde_json::{json, Map, Value};
use std::collections::HashMap;
use std::hash::{BuildHasher, BuildHasherDefault, Hasher, RandomState};
use std::sync::LazyLock;

/// The hash keys: random per process (SipHash-1-3, two independent keys for
/// 128 bits), so that no state a team's data shapes can be made to collide.
static KEYS: LazyLock<(RandomState, RandomState)> = LazyLock::new(|| (RandomState::new(), RandomState::new()));

/// 128 bits of keyed hash over what is written to it.
struct Hash128(std::hash::DefaultHasher, std::hash::DefaultHasher);

impl Hash128 {
    fn new() -> Self {
        Hash128(KEYS.0.build_hasher(), KEYS.1.build_hasher())
    }
    fn bytes(&mut self, b: &[u8]) {
        self.0.write(b);
        self.1.write(b);
    }
    fn u128(&mut self, v: u128) {
        self.bytes(&v.to_le_bytes());
    }
    fn finish(&self) -> u128 {
        ((self.0.finish() as u128) << 64) | self.1.finish() as u128
    }
}

/// The hash of an object member's path: its parent's and its key's.
fn member_path(parent: u128, key: &str) -> u128 {
    let mut h = Hash128::new();
    h.u128(parent);
    h.bytes(&(key.len() as u64).to_le_bytes());
    h.bytes(key.as_bytes());
    h.finish()
}

/// The hash of the root's path.
const ROOT: u128 = 0;

/// Hashes a value other than an object (type tag, then its content; an
/// array's elements in order, an object inside an array member by member).
fn hash_value(h: &mut Hash128, v: &Value) {
    match v {
        Value::Null => h.bytes(b"n"),
        Value::Bool(b) => h.bytes(if *b { b"t" } else { b"f" }),
        Value::Number(n) => {
            let text = n.to_string();
            h.bytes(b"#");
            h.bytes(&(text.len() as u64).to_le_bytes());
            h.bytes(text.as_bytes());
        }
        Value::String(s) => {
            h.bytes(b"s");
            h.bytes(&(s.len() as u64).to_le_bytes());
            h.bytes(s.as_bytes());
        }
        Value::Array(a) => {
            h.bytes(b"[");
            h.bytes(&(a.len() as u64).to_le_bytes());
            for e in a {
                hash_value(h, e);
            }
        }
        Value::Object(o) => {
            h.bytes(b"{");
            h.bytes(&(o.len() as u64).to_le_bytes());
            for (k, e) in o {
                h.bytes(&(k.len() as u64).to_le_bytes());
                h.bytes(k.as_bytes());
                hash_value(h, e);
            }
        }
    }
}

fn leaf_hash(v: &Value) -> u128 {
    let mut h = Hash128::new();
    hash_value(&mut h, v);
    h.finish()
}

/// What a fingerprint knows of the value at one path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Entry {
    /// An object with this many members (each has an entry of its own).
    Object { members: usize },
    /// Any other value, by its hash.
    Leaf(u128),
}

/// The path hashes are already uniform: the map uses their low bits as is.
#[derive(Default)]
struct PathHasher(u64);

impl Hasher for PathHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(*b);
        }
    }
    fn write_u128(&mut self, v: u128) {
        self.0 = v as u64;
    }
}

/// A state as [`diff_from`] compares it: per path (objects member by
/// member, from the root), an entry for an object and its number of
/// members, or a 128-bit keyed hash of any other value.
#[derive(Debug, Clone, Default)]
pub struct Fingerprint {
    entries: HashMap<u128, Entry, BuildHasherDefault<PathHasher>>,
}

impl Fingerprint {
    /// The fingerprint of `state` (one walk of it).
    pub fn of(state: &Value) -> Fingerprint {
        let mut fp = Fingerprint::default();
        fp.record(state, ROOT);
        fp
    }

    fn record(&mut self, v: &Value, path: u128) {
        match v {
            Value::Object(o) => {
                self.entries.insert(path, Entry::Object { members: o.len() });
                for (k, e) in o {
                    self.record(e, member_path(path, k));
                }
            }
            other => {
                self.entries.insert(path, Entry::Leaf(leaf_hash(other)));
            }
        }
    }
}

/// The operations that turn the state `before` was taken of into `after`
/// (an empty array when they are equal), and the fingerprint of `after`, in
/// one walk of `after`. An object present in both is compared member by
/// member; a member that is new or changed (and is not an object present in
/// both) is one `set`; an object that lost a member is one `set` of the
/// whole object.
pub fn diff_from(before: &Fingerprint, after: &Value) -> (Value, Fingerprint) {
    let mut ops = Vec::new();
    let mut next = Fingerprint { entries: HashMap::with_capacity_and_hasher(before.entries.len() + 4, Default::default()) };
    let mut path = Vec::new();
    walk(before, after, ROOT, &mut path, &mut ops, &mut next);
    (Value::Array(ops), next)
}

/// The operations that turn `before` into `after` ([`diff_from`] with the
/// fingerprint of `before`).
pub fn diff(before: &Value, after: &Value) -> Value {
    diff_from(&Fingerprint::of(before), after).0
}

fn walk<'a>(before: &Fingerprint, after: &'a Value, at: u128, path: &mut Vec<&'a str>, ops: &mut Vec<Value>, next: &mut Fingerprint) {
    match (before.entries.get(&at), after) {
        (Some(Entry::Object { members }), Value::Object(o)) => {
            let mark = ops.len();
            let mut kept = 0;
            for (k, v) in o {
                let child = member_path(at, k);
                if before.entries.contains_key(&child) {
                    kept += 1;
                }
                path.push(k);
                walk(before, v, child, path, ops, next);
                path.pop();
            }
            next.entries.insert(at, Entry::Object { members: o.len() });
            if kept < *members {
                // A member is gone: the object is set whole, instead of its
                // members' operations.
                ops.truncate(mark);
                ops.push(json!({"set": path, "value": after}));
            }
        }
        (Some(Entry::Leaf(hash)), v) if !v.is_object() => {
            let now = leaf_hash(v);
            if now != *hash {
                ops.push(json!({"set": path, "value": v}));
            }
            next.entries.insert(at, Entry::Leaf(now));
        }
        (_, v) => {
            ops.push(json!({"set": path, "value": v}));
            next.record(v, at);
        }
    }
}

/// Applies `patch` (as [`diff`] makes it) to `state`, as
/// `wardcall.apply_state_patch` does in SQL: an operation that is malformed
/// (a `set` without a value, a path that is not an array of keys) or whose
/// path does not lead through objects is skipped.
pub fn apply(state: &mut Value, patch: &Value) {
    for op in patch.as_array().map(Vec::as_slice).unwrap_or_default() {
        if let (Some(path), Some(value)) = (op.get("set").and_then(Value::as_array), op.get("value")) {
            let value = value.clone();
            match path.split_last() {
                None => *state = value,
                Some((last, parents)) => {
                    if let (Some(parent), Some(key)) = (object_at(state, parents), last.as_str()) {
                        parent.insert(key.to_string(), value);
                    }
                }
            }
        } else if let Some((last, parents)) = op.get("remove").and_then(Value::as_array).and_then(|p| p.split_last()) {
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
    fn the_next_fingerprint_is_the_afters() {
        let states = [json!({}), json!({"results": {"0": 1}}), json!({"results": {"0": 1, "1": [2]}}), json!({"results": {"1": [3]}, "x": null})];
        let mut fp = Fingerprint::of(&states[0]);
        for pair in states.windows(2) {
            let (patch, next) = diff_from(&fp, &pair[1]);
            let mut state = pair[0].clone();
            apply(&mut state, &patch);
            assert_eq!(state, pair[1]);
            assert_eq!(next.entries, Fingerprint::of(&pair[1]).entries);
            fp = next;
        }
    }
}
