//! A step's changes to its run's state, as the step log keeps them
//! (`wardcall.run_steps.patch`, migration 0017).
//!
//! A patch is a JSON array of operations applied in order:
//! `{"set": [key, …], "value": v}` creates or replaces the object member at
//! that path (`[]`: the whole state), `{"remove": [key, …]}` removes it.
//! Paths only descend through objects (an array is replaced whole), so each
//! operation is one `jsonb_set` or `#-` in SQL (`wardcall.apply_state_patch`),
//! and applying a patch to the state it was made from gives the state after
//! the step, JSON nulls included.

use serde_json::{json, Map, Value};

/// The operations that turn `before` into `after` (an empty array when they
/// are equal). Object members are compared recursively; any other change
/// (a scalar, an array, a type) is one `set` of the new value.
pub fn diff(before: &Value, after: &Value) -> Value {
    let mut ops = Vec::new();
    let mut path = Vec::new();
    diff_into(before, after, &mut path, &mut ops);
    Value::Array(ops)
}

fn diff_into<'a>(before: &'a Value, after: &'a Value, path: &mut Vec<&'a str>, ops: &mut Vec<Value>) {
    match (before, after) {
        (Value::Object(b), Value::Object(a)) => {
            for (key, old) in b {
                if !a.contains_key(key) {
                    path.push(key);
                    ops.push(json!({"remove": path}));
                    path.pop();
                } else {
                    path.push(key);
                    diff_into(old, &a[key], path, ops);
                    path.pop();
                }
            }
            for (key, new) in a {
                if !b.contains_key(key) {
                    path.push(key);
                    ops.push(json!({"set": path, "value": new}));
                    path.pop();
                }
            }
        }
        _ if before == after => {}
        _ => ops.push(json!({"set": path, "value": after})),
    }
}

/// Applies `patch` (as [`diff`] makes it) to `state`, as
/// `wardcall.apply_state_patch` does in SQL. An operation whose path does
/// not lead through objects is skipped (as `jsonb_set` leaves such a
/// document unchanged).
pub fn apply(state: &mut Value, patch: &Value) {
    for op in patch.as_array().map(Vec::as_slice).unwrap_or_default() {
        if let Some(path) = op.get("set").and_then(Value::as_array) {
            let value = op.get("value").cloned().unwrap_or(Value::Null);
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
    fn equal_states_give_an_empty_patch() {
        assert_eq!(round_trip(json!({"a": [1, 2], "b": {"c": null}}), json!({"a": [1, 2], "b": {"c": null}})), json!([]));
    }

    #[test]
    fn removals_nulls_arrays_and_type_changes() {
        round_trip(json!({"a": 1, "b": {"c": 2, "d": 3}, "e": [1, 2]}), json!({"b": {"c": null}, "e": [2], "f": {"g": []}}));
        round_trip(json!({"a": {"b": 1}}), json!({"a": "text"}));
        round_trip(json!({"a": "text"}), json!({"a": {"b": 1}}));
    }

    #[test]
    fn a_state_that_is_not_an_object_is_replaced_whole() {
        let patch = round_trip(json!({}), json!([1, 2]));
        assert_eq!(patch, json!([{"set": [], "value": [1, 2]}]));
        round_trip(Value::Null, json!({"cycle": 0}));
        round_trip(json!({"cycle": 0}), json!({}));
    }

    #[test]
    fn keys_are_taken_literally() {
        round_trip(json!({"a/b": {"~0": 1}, "{x,y}": 2}), json!({"a/b": {"~0": 2}, "{x,y}": 3, "": 4}));
    }
}
