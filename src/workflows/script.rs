//! The `script` workflow: a sequence of runtime primitives taken from the event
//! payload's `steps` array, for the demo, for checking a deployment end to end
//! (`wardcall emit`), and for the test suite. Each element is one of:
//!
//! - `{"op": "step", "name": "…"}`: a step whose result (the time it ran) is stored;
//! - `{"op": "sleep", "ms": N}`: a durable sleep of N milliseconds;
//! - `{"op": "sleep_until", "epoch_ms": N}`: a durable sleep until a UTC instant;
//! - `{"op": "wait", "signal": "…", "timeout_ms": N}`: wait for a signal;
//! - `{"op": "fail", "times": N, "error": "…"}`: fails its first N attempts
//!   (N < 0: always), exercising retry with backoff and the dead letter;
//! - `{"op": "work", "ms": N}`: holds the worker N milliseconds inside the step
//!   (a slow provider call), used to test takeover after a crash.
//!
//! The state records, per element index, what happened: `{"results": {"0": …}}`.

use super::{StepContext, StepError, Transition};
use anyhow::anyhow;
use serde_json::{json, Value};

fn step_name(i: usize) -> String {
    format!("op:{i}")
}

fn index_of(step: &str) -> Result<usize, StepError> {
    if step == "start" {
        return Ok(0);
    }
    step.strip_prefix("op:").and_then(|s| s.parse().ok()).ok_or_else(|| StepError::Permanent(anyhow!("unknown script step '{step}'")))
}

/// Whether the run's current element needs no I/O and parks or ends the run
/// ([`super::runs_in_claim`]): `sleep`, `sleep_until`, the last element when
/// it is a `step`, or past the end. (A `step` followed by more elements goes
/// on to the next one: it runs on a worker, which goes on with the run.)
pub fn runs_in_claim(run: &crate::store::runs::ClaimedRun) -> bool {
    let Ok(i) = index_of(&run.step) else { return false };
    let steps = run.input.get("steps").and_then(Value::as_array).map(Vec::as_slice).unwrap_or(&[]);
    match steps.get(i).map(|op| op.get("op").and_then(Value::as_str)) {
        None => true,
        Some(Some("sleep" | "sleep_until")) => true,
        Some(Some("step")) => i + 1 == steps.len(),
        Some(_) => false,
    }
}

/// Executes element `i` of the script.
pub async fn run_step(ctx: &mut StepContext<'_>) -> Result<Transition, StepError> {
    let run = ctx.run;
    let steps: &[Value] = run.input.get("steps").and_then(Value::as_array).map(Vec::as_slice).unwrap_or(&[]);
    let i = index_of(&ctx.run.step)?;
    // The state changes through `record_set` alone: the runtime logs the
    // recorded changes as the step's patch (`Host::records_state_changes`).
    if !ctx.state.is_object() {
        ctx.record_set(&[], json!({}));
    }
    // Record the outcome of the wait that led here, under the wait's index.
    if let Some(outcome) = ctx.wait_outcome().cloned() {
        if i > 0 {
            ctx.record_set(&["results", &(i - 1).to_string()], outcome);
        }
    }
    let Some(op) = steps.get(i) else {
        return Ok(Transition::Complete);
    };
    let next = step_name(i + 1);
    // After the script's last element the run ends in that element's own
    // transition (as `flow::after` does for a list of steps).
    let done = if steps.get(i + 1).is_some() { Transition::Next { step: next.clone() } } else { Transition::Complete };
    let kind = op.get("op").and_then(Value::as_str).unwrap_or("");
    let number = |k: &str| op.get(k).and_then(Value::as_i64);
    let result = |ctx: &mut StepContext<'_>, v: Value| {
        ctx.record_set(&["results", &i.to_string()], v);
    };
    match kind {
        "step" => {
            let ran_at = jiff::Timestamp::now().to_string();
            result(ctx, json!({"name": op.get("name"), "ran_at": ran_at, "attempt": ctx.run.step_attempt + 1}));
            Ok(done)
        }
        "work" => {
            let ms = number("ms").unwrap_or(0).max(0) as u64;
            tokio::time::sleep(std::time::Duration::from_millis(ms)).await;
            ctx.check_lease()?;
            result(ctx, json!({"worked_ms": ms, "by": ctx.services.engine_id}));
            Ok(done)
        }
        "sleep" => {
            let ms = number("ms").ok_or_else(|| StepError::Permanent(anyhow!("sleep at {i} needs 'ms'")))?;
            result(ctx, json!({"slept_ms": ms}));
            Ok(Transition::Sleep { step: next, delay_ms: ms.max(0) })
        }
        "sleep_until" => {
            let at = number("epoch_ms").ok_or_else(|| StepError::Permanent(anyhow!("sleep_until at {i} needs 'epoch_ms'")))?;
            result(ctx, json!({"until_epoch_ms": at}));
            Ok(Transition::SleepUntil { step: next, epoch_ms: at })
        }
        "wait" => {
            let signal = op.get("signal").and_then(Value::as_str).unwrap_or("go").to_string();
            let timeout_ms = number("timeout_ms").unwrap_or(60_000).max(0);
            Ok(Transition::Wait { step: next, signal, timeout_ms })
        }
        "fail" => {
            let times = number("times").unwrap_or(-1);
            let error = op.get("error").and_then(Value::as_str).unwrap_or("scripted failure").to_string();
            if times < 0 || (ctx.run.step_attempt as i64) < times {
                Err(StepError::Retryable(anyhow!("{error} (attempt {})", ctx.run.step_attempt + 1)))
            } else {
                result(ctx, json!({"succeeded_after_attempts": ctx.run.step_attempt + 1}));
                Ok(done)
            }
        }
        other => Err(StepError::Permanent(anyhow!("unknown op '{other}' at step {i}"))),
    }
}
