//! Twilio's *connection overrides* on the callback URLs wardcall gives
//! Twilio (built by [`super::callback_url`]).
//!
//! Every webhook URL wardcall hands to Twilio (the `StatusCallback`, the
//! `AsyncAmdStatusCallback` and the `<Gather action>`) ends in a URL fragment
//! asking Twilio to retry a callback that could not be delivered or that got
//! a 5xx answer, so that a keypress survives a brief database outage (the
//! webhook answers 503 when it cannot record the callback).
//!
//! Contract: Twilio "Webhooks (HTTP callbacks): Connection Overrides",
//! <https://www.twilio.com/docs/usage/webhooks/webhooks-connection-overrides>.
//! The overrides are `key=value` pairs joined by `&` in the URL fragment
//! (after `#`): `ct` connect timeout (ms, 100..=10000, default 5000), `rt`
//! read timeout (ms, 100..=15000, default 15000), `tt` total time for all
//! attempts (ms, 100..=15000, default 15000), `rc` retry count (0..=5,
//! default 1), `rp` retry policy (comma-separated subset of `4xx`, `5xx`,
//! `ct`, `rt`, `all`; default `ct`). Twilio reports a bad `rp` as error 11243.
//!
//! **Signatures.** A URL fragment is never sent to the server, but Twilio's
//! helper libraries (`RequestValidator` in twilio-python, `validateRequest` in
//! twilio-node) sign the string they are given, fragment included
//! (`urlparse(..).geturl()` and `URL.toString()` keep it), and their guidance
//! is to pass "the full URL you configured". Twilio's documentation does not
//! say which form its servers sign, so wardcall accepts a signature over
//! either form (see [`signed_url_candidates`]); the emulator signs the URL as
//! configured, fragment included.

use std::time::Duration;

/// The connection overrides on every callback URL: connect within 3 s, an
/// answer within 6 s (the webhook's own database deadline is 5 s, see
/// `crate::http::WEBHOOK_DEADLINE`), up to 5 retries within Twilio's maximum
/// total of 15 s, retried on a connect failure, a read timeout or a 5xx.
/// Never on a 4xx: a bad signature (403) or an unknown attempt (404) is final.
pub const CONNECTION_OVERRIDES: &str = "ct=3000&rt=6000&tt=15000&rc=5&rp=ct,rt,5xx";

/// The URLs a webhook's `X-Twilio-Signature` may have been computed over,
/// given the URL the server saw (`public_url` + path and query, no
/// fragment): that URL with wardcall's fragment (what the configured URL and
/// the SDK validators use), and the URL without it.
pub fn signed_url_candidates(url_without_fragment: &str) -> [String; 2] {
    [format!("{url_without_fragment}#{CONNECTION_OVERRIDES}"), url_without_fragment.to_string()]
}

/// Connection overrides parsed from a URL fragment, with Twilio's documented
/// defaults for absent keys and values clamped to the documented ranges.
/// Used by the emulator to deliver callbacks the way Twilio does.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConnectionOverrides {
    /// `ct`: TCP connect timeout.
    pub connect_timeout: Duration,
    /// `rt`: time to wait for the response.
    pub read_timeout: Duration,
    /// `tt`: total time for the first attempt and every retry.
    pub total_time: Duration,
    /// `rc`: retries after the first attempt.
    pub retry_count: u32,
    /// `rp` contains `ct` (or `all`): retry a connect failure or connect timeout.
    pub retry_connect_failure: bool,
    /// `rp` contains `rt` (or `all`): retry a read timeout.
    pub retry_read_timeout: bool,
    /// `rp` contains `4xx` (or `all`).
    pub retry_4xx: bool,
    /// `rp` contains `5xx` (or `all`).
    pub retry_5xx: bool,
}

impl Default for ConnectionOverrides {
    /// Twilio's defaults: ct 5000 ms, rt 15000 ms, tt 15000 ms, rc 1, rp `ct`.
    fn default() -> Self {
        ConnectionOverrides {
            connect_timeout: Duration::from_millis(5000),
            read_timeout: Duration::from_millis(15000),
            total_time: Duration::from_millis(15000),
            retry_count: 1,
            retry_connect_failure: true,
            retry_read_timeout: false,
            retry_4xx: false,
            retry_5xx: false,
        }
    }
}

impl ConnectionOverrides {
    /// Splits `url` into the URL to request (no fragment) and its overrides.
    /// Unknown keys (`e` edge, `sni`) and malformed values are ignored, leaving
    /// the default.
    pub fn from_url(url: &str) -> (&str, ConnectionOverrides) {
        let Some((base, fragment)) = url.split_once('#') else {
            return (url, ConnectionOverrides::default());
        };
        let mut o = ConnectionOverrides::default();
        let ms = |v: &str, min: u64, max: u64| v.parse::<u64>().ok().map(|n| Duration::from_millis(n.clamp(min, max)));
        for pair in fragment.split('&') {
            let Some((k, v)) = pair.split_once('=') else {
                continue;
            };
            match k {
                "ct" => o.connect_timeout = ms(v, 100, 10_000).unwrap_or(o.connect_timeout),
                "rt" => o.read_timeout = ms(v, 100, 15_000).unwrap_or(o.read_timeout),
                "tt" => o.total_time = ms(v, 100, 15_000).unwrap_or(o.total_time),
                "rc" => o.retry_count = v.parse::<u32>().map(|n| n.min(5)).unwrap_or(o.retry_count),
                "rp" => {
                    let items: Vec<&str> = v.split(',').map(str::trim).collect();
                    let all = items.contains(&"all");
                    o.retry_connect_failure = all || items.contains(&"ct");
                    o.retry_read_timeout = all || items.contains(&"rt");
                    o.retry_4xx = all || items.contains(&"4xx");
                    o.retry_5xx = all || items.contains(&"5xx");
                }
                _ => {}
            }
        }
        (base, o)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn callback_urls_carry_the_overrides() {
        let a = uuid::Uuid::nil();
        let u = crate::providers::twilio::callback_url("https://w.example.org/", "gather", a);
        assert_eq!(u, format!("https://w.example.org/webhooks/twilio/gather?attempt={a}#ct=3000&rt=6000&tt=15000&rc=5&rp=ct,rt,5xx"));
        let (base, o) = ConnectionOverrides::from_url(&u);
        assert_eq!(base, format!("https://w.example.org/webhooks/twilio/gather?attempt={a}"));
        assert_eq!(o.retry_count, 5);
        assert!(o.retry_5xx && o.retry_connect_failure && o.retry_read_timeout && !o.retry_4xx);
        assert_eq!(o.read_timeout, Duration::from_millis(6000));
    }

    #[test]
    fn overrides_default_and_clamp() {
        let (base, o) = ConnectionOverrides::from_url("http://h/x?a=1");
        assert_eq!(base, "http://h/x?a=1");
        assert_eq!(o, ConnectionOverrides::default());
        let (_, o) = ConnectionOverrides::from_url("http://h/x#rc=9&tt=99999&rp=all&sni=y");
        assert_eq!(o.retry_count, 5);
        assert_eq!(o.total_time, Duration::from_millis(15_000));
        assert!(o.retry_4xx);
    }
}
