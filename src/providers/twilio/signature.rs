//! `X-Twilio-Signature`: Twilio's HMAC-SHA1 webhook signature.
//!
//! Follows Twilio's "Webhooks security" guide
//! (<https://www.twilio.com/docs/usage/webhooks/webhooks-security>) and the
//! request validators in Twilio's helper libraries (twilio-python
//! `RequestValidator`, twilio-node `validateRequest`):
//!
//! 1. Start from the full URL Twilio requested, scheme through query string,
//!    exactly as it was configured (for example the `StatusCallback` or the
//!    `<Gather action>` URL the engine handed to Twilio).
//! 2. For form-encoded `POST` requests, sort the body parameters by name
//!    (byte-wise, which for UTF-8 is code-point order) and append each
//!    parameter's name immediately followed by its value, with no
//!    separators. Repeated names are ordered by value. `GET` requests carry
//!    their parameters in the query string, so they add nothing here.
//! 3. HMAC-SHA1 the resulting string with the account Auth Token as the key.
//! 4. Base64-encode the 20-byte digest (standard alphabet, padded).
//!
//! Only the form-encoded scheme is implemented; Twilio's JSON-bodied
//! webhooks (`bodySHA256` query parameter) are not used by Programmable
//! Voice call-progress or `<Gather>` callbacks.

use base64::Engine as _;
use hmac::{Hmac, Mac};
use sha1::Sha1;

type HmacSha1 = Hmac<Sha1>;

/// Name of the HTTP request header Twilio puts the signature in.
pub const SIGNATURE_HEADER: &str = "X-Twilio-Signature";

/// Computes the `X-Twilio-Signature` value Twilio would send for a request.
///
/// * `auth_token` — the account's (primary) Auth Token, used as the HMAC key.
/// * `url` — the full URL Twilio requested, including any query string,
///   byte-for-byte as configured (no normalisation is applied).
/// * `params` — the decoded `application/x-www-form-urlencoded` body
///   parameters, in any order; pass `&[]` for `GET` requests.
///
/// Returns 28 characters of standard, padded base64 (a 20-byte HMAC-SHA1).
///
/// Sorting is by name, then by value for repeated names; identical
/// name/value pairs count once, as in the official SDKs' validators
/// (twilio-python `RequestValidator.compute_signature`, twilio-node
/// `getExpectedTwilioSignature`), so a repeated identical parameter neither
/// breaks a genuine signature nor lets a forged one through.
pub fn compute_signature(auth_token: &str, url: &str, params: &[(String, String)]) -> String {
    let digest = keyed_mac(auth_token, url, params).finalize().into_bytes();
    base64::engine::general_purpose::STANDARD.encode(digest)
}

/// Checks an `X-Twilio-Signature` header value in constant time.
///
/// Returns `true` only when `header_value` is the base64 HMAC-SHA1 of `url`
/// plus the sorted `params` under `auth_token` (see [`compute_signature`]).
/// An empty or non-base64 header value yields `false`, never a panic.
///
/// Like Twilio's own validators, the URL is also tried with its port
/// toggled: if `url` names a port, the variant without it is tried too; if it
/// names none, the variant with the scheme's default port (`:443` for
/// `https`, `:80` for `http`) is tried. This covers load balancers and
/// proxies that add or drop the port between Twilio and the application.
/// Every candidate is compared with [`hmac::Mac::verify_slice`], which is
/// constant-time.
pub fn verify_signature(auth_token: &str, url: &str, params: &[(String, String)], header_value: &str) -> bool {
    if header_value.is_empty() {
        return false;
    }
    let Ok(expected) = base64::engine::general_purpose::STANDARD.decode(header_value) else {
        return false;
    };
    let mut valid = keyed_mac(auth_token, url, params).verify_slice(&expected).is_ok();
    if let Some(alternate) = toggle_port(url) {
        // Non-short-circuiting `|` so both candidates are always computed.
        valid |= keyed_mac(auth_token, &alternate, params).verify_slice(&expected).is_ok();
    }
    valid
}

fn keyed_mac(auth_token: &str, url: &str, params: &[(String, String)]) -> HmacSha1 {
    // HMAC accepts keys of any length, so this cannot fail.
    let mut mac = HmacSha1::new_from_slice(auth_token.as_bytes()).expect("HMAC-SHA1 accepts keys of any length");
    mac.update(url.as_bytes());
    let mut sorted: Vec<&(String, String)> = params.iter().collect();
    sorted.sort_by(|a, b| a.0.cmp(&b.0).then_with(|| a.1.cmp(&b.1)));
    // Identical name/value pairs count once: the official SDKs collect a
    // repeated name's values into a set (twilio-python `sorted(set(values))`,
    // twilio-node `Array.from(new Set(values)).sort()`).
    sorted.dedup();
    for (name, value) in sorted {
        mac.update(name.as_bytes());
        mac.update(value.as_bytes());
    }
    mac
}

/// Returns `url` with its explicit port removed, or with the scheme's default
/// port added when it has none. `None` when the URL is not `http(s)://…` or
/// its authority cannot be located. Pure string surgery: the rest of the URL
/// is kept byte-for-byte, because the signature is over the exact bytes.
fn toggle_port(url: &str) -> Option<String> {
    let (scheme, rest) = url.split_once("://")?;
    let default_port = match scheme.to_ascii_lowercase().as_str() {
        "https" => "443",
        "http" => "80",
        _ => return None,
    };
    let authority_len = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(authority_len);
    // Skip any userinfo ("user:pass@host").
    let host_start = authority.rfind('@').map_or(0, |i| i + 1);
    let host_port = &authority[host_start..];
    // An IPv6 literal is bracketed; the port separator comes after ']'.
    let search_from = host_port.rfind(']').map_or(0, |i| i + 1);
    let port_colon = host_port[search_from..].rfind(':').map(|i| search_from + i);
    let prefix = &url[..scheme.len() + 3 + host_start];
    match port_colon {
        Some(colon) => {
            let host = &host_port[..colon];
            if host.is_empty() {
                return None;
            }
            Some(format!("{prefix}{host}{tail}"))
        }
        None => {
            if host_port.is_empty() {
                return None;
            }
            Some(format!("{prefix}{host_port}:{default_port}{tail}"))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pairs(list: &[(&str, &str)]) -> Vec<(String, String)> {
        list.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    const URL: &str = "https://mycompany.com/myapp.php?foo=1&bar=2";
    const TOKEN: &str = "12345";

    /// The worked example of Twilio's "Webhooks security" guide (also the
    /// fixture of many third-party validators): token `12345`.
    fn docs_params() -> Vec<(String, String)> {
        pairs(&[("CallSid", "CA1234567890ABCDE"), ("Caller", "+12349013030"), ("Digits", "1234"), ("From", "+12349013030"), ("To", "+18005551212")])
    }

    #[test]
    fn twilio_docs_example_vector() {
        assert_eq!(compute_signature(TOKEN, URL, &docs_params()), "0/KCTR6DLpKmkAf8muzZqo1nDgQ=");
        assert!(verify_signature(TOKEN, URL, &docs_params(), "0/KCTR6DLpKmkAf8muzZqo1nDgQ="));
    }

    /// twilio-python tests/unit/test_request_validator.py: same URL and token,
    /// a different caller number, parameters given out of order.
    #[test]
    fn twilio_python_vector_and_parameter_order() {
        let params =
            pairs(&[("To", "+18005551212"), ("Caller", "+14158675309"), ("From", "+14158675309"), ("Digits", "1234"), ("CallSid", "CA1234567890ABCDE")]);
        assert_eq!(compute_signature(TOKEN, URL, &params), "RSOYDt4T1cUTdK1PDd93/VVr8B8=");
    }

    /// twilio-python `test_compute_signature_duplicate_multi_dict`: repeated
    /// names are ordered by value.
    #[test]
    fn twilio_python_duplicate_parameter_vector() {
        let params = pairs(&[("Sid", "CA123"), ("SidAccount", "AC123"), ("Digits", "5678"), ("Digits", "1234")]);
        assert_eq!(compute_signature(TOKEN, URL, &params), "IK+Dwps556ElfBT0I3Rgjkr1wJU=");
    }

    /// A repeated identical pair signs as one, as the SDKs' sets make it:
    /// the duplicate vector above with `Digits=1234` sent twice still
    /// verifies, and the docs vector with `Digits=1234` repeated does too.
    #[test]
    fn identical_repeated_parameters_count_once() {
        let params = pairs(&[("Sid", "CA123"), ("Digits", "1234"), ("SidAccount", "AC123"), ("Digits", "5678"), ("Digits", "1234")]);
        assert_eq!(compute_signature(TOKEN, URL, &params), "IK+Dwps556ElfBT0I3Rgjkr1wJU=");
        let mut docs = docs_params();
        docs.push(("Digits".into(), "1234".into()));
        assert!(verify_signature(TOKEN, URL, &docs, "0/KCTR6DLpKmkAf8muzZqo1nDgQ="));
        // A different repeated value is a different request.
        docs.push(("Digits".into(), "9".into()));
        assert!(!verify_signature(TOKEN, URL, &docs, "0/KCTR6DLpKmkAf8muzZqo1nDgQ="));
    }

    /// twilio-python's port vectors: a validator must accept the signature
    /// whether or not a proxy added/removed the port.
    #[test]
    fn port_variants_like_twilio_validators() {
        let params =
            pairs(&[("CallSid", "CA1234567890ABCDE"), ("Digits", "1234"), ("From", "+14158675309"), ("To", "+18005551212"), ("Caller", "+14158675309")]);
        // Signed without port, received with a port.
        assert!(verify_signature(TOKEN, "https://mycompany.com:1234/myapp.php?foo=1&bar=2", &params, "RSOYDt4T1cUTdK1PDd93/VVr8B8="));
        // Signed with :443, received without it.
        assert!(verify_signature(TOKEN, URL, &params, "kvajT1Ptam85bY51eRf/AJRuM3w="));
        // http with :80 added.
        assert!(verify_signature(TOKEN, "http://mycompany.com/myapp.php?foo=1&bar=2", &params, "0ZXoZLH/DfblKGATFgpif+LLRf4="));
        // http signed with :1234, received with :1234.
        assert!(verify_signature(TOKEN, "http://mycompany.com:1234/myapp.php?foo=1&bar=2", &params, "Zmvh+3yNM1Phv2jhDCwEM3q5ebU="));
    }

    #[test]
    fn toggle_port_cases() {
        assert_eq!(toggle_port("https://a.example/x?y=1").as_deref(), Some("https://a.example:443/x?y=1"));
        assert_eq!(toggle_port("http://a.example:8080").as_deref(), Some("http://a.example"));
        assert_eq!(toggle_port("http://u:p@[::1]:9/cb").as_deref(), Some("http://u:p@[::1]/cb"));
        assert_eq!(toggle_port("http://[::1]/cb").as_deref(), Some("http://[::1]:80/cb"));
        assert_eq!(toggle_port("wss://a.example/x"), None);
        assert_eq!(toggle_port("not a url"), None);
    }

    #[test]
    fn wrong_signature_is_rejected() {
        let params = docs_params();
        // Right length, wrong bytes.
        assert!(!verify_signature(TOKEN, URL, &params, "1/KCTR6DLpKmkAf8muzZqo1nDgQ="));
        // One character short (invalid padding).
        assert!(!verify_signature(TOKEN, URL, &params, "0/KCTR6DLpKmkAf8muzZqo1nDgQ"));
        // Not base64 at all.
        assert!(!verify_signature(TOKEN, URL, &params, "%%%not-base64%%%"));
        // Right signature, wrong token.
        assert!(!verify_signature("54321", URL, &params, "0/KCTR6DLpKmkAf8muzZqo1nDgQ="));
        // Right signature, different URL.
        assert!(!verify_signature(TOKEN, "https://mycompany.com/myapp.php?foo=1&bar=3", &params, "0/KCTR6DLpKmkAf8muzZqo1nDgQ="));
    }

    #[test]
    fn tampered_parameter_is_rejected() {
        let mut params = docs_params();
        params[2].1 = "9".into(); // Digits
        assert!(!verify_signature(TOKEN, URL, &params, "0/KCTR6DLpKmkAf8muzZqo1nDgQ="));
        // An extra parameter is also a tamper.
        let mut params = docs_params();
        params.push(("Extra".into(), String::new()));
        assert!(!verify_signature(TOKEN, URL, &params, "0/KCTR6DLpKmkAf8muzZqo1nDgQ="));
    }

    #[test]
    fn missing_header_value_is_rejected() {
        assert!(!verify_signature(TOKEN, URL, &docs_params(), ""));
    }

    #[test]
    fn round_trip_with_unicode_and_empty_values() {
        let params = pairs(&[("Zoë", "Ünïcødé — ✓"), ("Empty", ""), ("A", "&=?+")]);
        let url = "https://example.org/hook?q=%C3%BC";
        let sig = compute_signature("tok", url, &params);
        assert_eq!(sig.len(), 28);
        assert!(verify_signature("tok", url, &params, &sig));
    }
}
