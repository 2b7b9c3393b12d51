//! TwiML documents for alert calls, and the minimal XML reader the emulator
//! uses to execute them.
//!
//! Follows Twilio's TwiML reference: `<Response>`
//! (<https://www.twilio.com/docs/voice/twiml>), `<Gather>`
//! (<https://www.twilio.com/docs/voice/twiml/gather>), `<Say>`
//! (<https://www.twilio.com/docs/voice/twiml/say>) and `<Hangup>`
//! (<https://www.twilio.com/docs/voice/twiml/hangup>).
//!
//! Size limits: TwiML sent inline as the Calls API `Twiml` parameter may be
//! at most 4,000 characters (Twilio error 32018,
//! [`crate::providers::twilio::client::MAX_INLINE_TWIML_CHARS`]); TwiML returned from a
//! webhook may be at most 64 kB (error 11750). Escaping grows the text
//! (`&` becomes five characters), so measure the generated document, not
//! the message.

use std::fmt::Write as _;

/// Said after a `<Gather>` that received no key press, before hanging up.
pub const NO_INPUT_GOODBYE: &str = "No key was pressed. Goodbye.";

/// Escapes text for use in XML character data or a double- or
/// single-quoted attribute value.
///
/// `&` `<` `>` `"` `'` become `&amp;` `&lt;` `&gt;` `&quot;` `&apos;`.
/// Characters that XML 1.0 does not allow at all (C0 controls other than tab,
/// line feed and carriage return, and U+FFFE/U+FFFF) are dropped, since no
/// escape can represent them. Everything else, including non-ASCII letters,
/// passes through unchanged as UTF-8.
pub fn escape_xml(text: &str) -> String {
    let mut out = String::with_capacity(text.len() + text.len() / 8);
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&apos;"),
            c if is_xml_char(c) => out.push(c),
            _ => {}
        }
    }
    out
}

/// XML 1.0 `Char` production: #x9 | #xA | #xD | [#x20-#xD7FF] |
/// [#xE000-#xFFFD] | [#x10000-#x10FFFF]. (Rust `char` excludes surrogates.)
fn is_xml_char(c: char) -> bool {
    matches!(c, '\t' | '\n' | '\r') || (c >= ' ' && c != '\u{FFFE}' && c != '\u{FFFF}')
}

const XML_DECLARATION: &str = r#"<?xml version="1.0" encoding="UTF-8"?>"#;

/// A complete TwiML document that reads `message` aloud and waits for one
/// key press, then posts it to `action_url`.
///
/// Shape (one line, no insignificant whitespace):
///
/// ```text
/// <?xml version="1.0" encoding="UTF-8"?><Response>
///   <Gather input="dtmf" numDigits="1" action="{action_url}" method="POST" timeout="{N}">
///     <Say>{message}</Say>
///   </Gather>
///   <Say>No key was pressed. Goodbye.</Say><Hangup/>
/// </Response>
/// ```
///
/// * `message` — spoken with Twilio's default voice; nested inside
///   `<Gather>` so that a key press interrupts the speech (Twilio stops
///   nested `<Say>` on the first digit).
/// * `action_url` — absolute `http(s)` URL. Twilio `POST`s `Digits`
///   (the pressed key), `FinishedOnKey` and the call parameters there,
///   signed with `X-Twilio-Signature`; the response must be TwiML.
/// * `gather_timeout_seconds` — seconds Twilio waits for a key after the
///   message finishes (Gather `timeout`, Twilio's default is 5). `0` is
///   raised to `1`.
///
/// If no key is pressed before the timeout, Twilio does not call
/// `action_url` and continues with the verbs after `<Gather>`: a goodbye
/// and `<Hangup/>`, so the call completes and the status callback reports
/// `completed` without any `Digits`.
pub fn say_and_gather(message: &str, action_url: &str, gather_timeout_seconds: u32) -> String {
    let mut doc = String::with_capacity(256 + message.len() + action_url.len());
    doc.push_str(XML_DECLARATION);
    let _ = write!(
        doc,
        r#"<Response><Gather input="dtmf" numDigits="1" action="{}" method="POST" timeout="{}"><Say>{}</Say></Gather><Say>{}</Say><Hangup/></Response>"#,
        escape_xml(action_url),
        gather_timeout_seconds.max(1),
        escape_xml(&speakable(message)),
        NO_INPUT_GOODBYE,
    );
    doc
}

/// Said after a shortened message, still inside the `<Gather>`, so that a
/// message cut to fit the provider's limit never loses the keypad
/// instruction.
pub const KEYPAD_INSTRUCTION: &str = "Press 1 to acknowledge this alert.";

/// The message spoken when the provider refused the alert's own TwiML for
/// its content (Twilio 32018, 12100, 12200, 13520): short, plain ASCII, and
/// still asks for the keypress.
pub const FALLBACK_MESSAGE: &str = "Critical alert. The alert text could not be read. Please check the alert system now. Press 1 to acknowledge this alert.";

/// Text fit to be spoken: NUL and every other control character (C0, DEL,
/// C1) removed; tabs and line breaks become a space. Letters, digits and
/// punctuation of any script pass through unchanged.
pub fn speakable(text: &str) -> String {
    text.chars()
        .filter_map(|c| match c {
            '\t' | '\n' | '\r' => Some(' '),
            c if c.is_control() => None,
            c => Some(c),
        })
        .collect()
}

/// Like [`say_and_gather`], but guaranteed to be at most `max_chars`
/// characters long (Unicode scalar values, as Twilio counts the `Twiml`
/// parameter; 4,000 for inline TwiML,
/// [`crate::providers::twilio::client::MAX_INLINE_TWIML_CHARS`]).
///
/// The message is first made [`speakable`]. If the document is still too
/// long once escaped (`&` alone grows to five characters), the message keeps
/// as much of its start as fits, followed by "…" and a second `<Say>` of
/// [`KEYPAD_INSTRUCTION`] inside the same `<Gather>`, so the nurse still
/// hears what to press. Returns `None` only when not even an empty message
/// fits (an absurd `action_url` or `max_chars`).
pub fn say_and_gather_within(message: &str, action_url: &str, gather_timeout_seconds: u32, max_chars: usize) -> Option<String> {
    let message = speakable(message);
    let full = say_and_gather(&message, action_url, gather_timeout_seconds);
    if full.chars().count() <= max_chars {
        return Some(full);
    }
    let chars: Vec<char> = message.chars().collect();
    let build = |n: usize| -> String {
        let mut doc = String::with_capacity(max_chars + 64);
        doc.push_str(XML_DECLARATION);
        let head: String = chars[..n].iter().collect();
        let _ = write!(
            doc,
            r#"<Response><Gather input="dtmf" numDigits="1" action="{}" method="POST" timeout="{}"><Say>{}…</Say><Say>{}</Say></Gather><Say>{}</Say><Hangup/></Response>"#,
            escape_xml(action_url),
            gather_timeout_seconds.max(1),
            escape_xml(head.trim_end()),
            KEYPAD_INSTRUCTION,
            NO_INPUT_GOODBYE,
        );
        doc
    };
    // The escaped length grows with n: binary search the longest prefix that fits.
    let (mut lo, mut hi) = (0usize, chars.len());
    if build(0).chars().count() > max_chars {
        return None;
    }
    while lo < hi {
        let mid = (lo + hi).div_ceil(2);
        if build(mid).chars().count() <= max_chars {
            lo = mid;
        } else {
            hi = mid - 1;
        }
    }
    Some(build(lo))
}

/// A complete TwiML document that reads `message` aloud and hangs up:
/// `<?xml version="1.0" encoding="UTF-8"?><Response><Say>{message}</Say><Hangup/></Response>`.
///
/// Typical use: the response to a `<Gather>` action ("Acknowledged. Thank
/// you.").
pub fn say_and_hangup(message: &str) -> String {
    let mut doc = String::with_capacity(96 + message.len());
    doc.push_str(XML_DECLARATION);
    let _ = write!(doc, "<Response><Say>{}</Say><Hangup/></Response>", escape_xml(&speakable(message)));
    doc
}

// ---------------------------------------------------------------------------
// Minimal XML reader (crate-internal): enough of XML 1.0 to execute TwiML.
// Elements, attributes, character data, the five predefined entities and
// numeric character references, CDATA sections, comments and processing
// instructions. Document type declarations are refused (no entity
// expansion). Nesting depth is bounded, so hostile input cannot overflow
// the stack.
// ---------------------------------------------------------------------------

const MAX_DEPTH: usize = 64;

/// An XML element.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Element {
    pub name: String,
    pub attrs: Vec<(String, String)>,
    pub children: Vec<Node>,
}

/// A child of an [`Element`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Node {
    Element(Element),
    Text(String),
}

impl Element {
    /// The unescaped value of attribute `name` (case-sensitive, as in XML).
    pub fn attr(&self, name: &str) -> Option<&str> {
        self.attrs.iter().find(|(n, _)| n == name).map(|(_, v)| v.as_str())
    }

    /// Child elements, in document order.
    pub fn elements(&self) -> impl Iterator<Item = &Element> {
        self.children.iter().filter_map(|n| match n {
            Node::Element(e) => Some(e),
            Node::Text(_) => None,
        })
    }

    /// All character data below this element, concatenated.
    pub fn text(&self) -> String {
        let mut out = String::new();
        fn collect(e: &Element, out: &mut String) {
            for n in &e.children {
                match n {
                    Node::Text(t) => out.push_str(t),
                    Node::Element(c) => collect(c, out),
                }
            }
        }
        collect(self, &mut out);
        out
    }
}

/// Parses a whole XML document and returns its root element.
pub(crate) fn parse_document(src: &str) -> Result<Element, String> {
    let src = src.strip_prefix('\u{FEFF}').unwrap_or(src);
    let mut p = Parser { src, pos: 0 };
    p.skip_misc()?;
    if !p.rest().starts_with('<') {
        return Err(p.err("expected the root element"));
    }
    let root = p.element(0)?;
    p.skip_misc()?;
    if p.pos != src.len() {
        return Err(p.err("content after the root element"));
    }
    Ok(root)
}

struct Parser<'a> {
    src: &'a str,
    pos: usize,
}

impl<'a> Parser<'a> {
    fn rest(&self) -> &'a str {
        &self.src[self.pos..]
    }

    fn err(&self, what: &str) -> String {
        format!("{what} at byte {}", self.pos)
    }

    fn skip_ws(&mut self) {
        let rest = self.rest();
        let trimmed = rest.trim_start_matches([' ', '\t', '\r', '\n']);
        self.pos += rest.len() - trimmed.len();
    }

    /// Skips past the next `end`, or fails.
    fn skip_past(&mut self, end: &str, what: &str) -> Result<&'a str, String> {
        match self.rest().find(end) {
            Some(i) => {
                let skipped = &self.rest()[..i];
                self.pos += i + end.len();
                Ok(skipped)
            }
            None => Err(self.err(what)),
        }
    }

    /// Whitespace, comments and processing instructions (incl. the XML
    /// declaration) outside the root element.
    fn skip_misc(&mut self) -> Result<(), String> {
        loop {
            self.skip_ws();
            let rest = self.rest();
            if rest.starts_with("<?") {
                self.skip_past("?>", "unterminated processing instruction")?;
            } else if rest.starts_with("<!--") {
                self.skip_past("-->", "unterminated comment")?;
            } else if rest.starts_with("<!") {
                return Err(self.err("document type declarations are not supported"));
            } else {
                return Ok(());
            }
        }
    }

    fn name(&mut self) -> Result<String, String> {
        let rest = self.rest();
        let len = rest.find(|c: char| c.is_whitespace() || "/>=<\"'&".contains(c)).unwrap_or(rest.len());
        let name = &rest[..len];
        let Some(first) = name.chars().next() else {
            return Err(self.err("expected a name"));
        };
        if first.is_ascii_digit() || matches!(first, '-' | '.' | '!' | '?') {
            return Err(self.err("invalid name"));
        }
        self.pos += len;
        Ok(name.to_string())
    }

    fn expect(&mut self, c: char) -> Result<(), String> {
        if self.rest().starts_with(c) {
            self.pos += c.len_utf8();
            Ok(())
        } else {
            Err(self.err(&format!("expected '{c}'")))
        }
    }

    fn element(&mut self, depth: usize) -> Result<Element, String> {
        if depth >= MAX_DEPTH {
            return Err(self.err("elements nested too deeply"));
        }
        self.expect('<')?;
        let name = self.name()?;
        let mut element = Element { name, attrs: Vec::new(), children: Vec::new() };
        loop {
            let before = self.pos;
            self.skip_ws();
            let rest = self.rest();
            if rest.starts_with("/>") {
                self.pos += 2;
                return Ok(element);
            }
            if rest.starts_with('>') {
                self.pos += 1;
                break;
            }
            if self.pos == before {
                return Err(self.err("expected whitespace before an attribute"));
            }
            let attr_name = self.name()?;
            self.skip_ws();
            self.expect('=')?;
            self.skip_ws();
            let quote = match self.rest().chars().next() {
                Some(q @ ('"' | '\'')) => q,
                _ => return Err(self.err("expected a quoted attribute value")),
            };
            self.pos += 1;
            let raw = self.skip_past(if quote == '"' { "\"" } else { "'" }, "unterminated attribute value")?;
            if raw.contains('<') {
                return Err(self.err("'<' in an attribute value"));
            }
            let value = unescape(raw).map_err(|e| self.err(&e))?;
            if element.attr(&attr_name).is_some() {
                return Err(self.err("duplicate attribute"));
            }
            element.attrs.push((attr_name, value));
        }
        // Content.
        loop {
            let rest = self.rest();
            if rest.is_empty() {
                return Err(self.err(&format!("unclosed element <{}>", element.name)));
            }
            if rest.starts_with("</") {
                self.pos += 2;
                let closing = self.name()?;
                self.skip_ws();
                self.expect('>')?;
                if closing != element.name {
                    return Err(self.err(&format!("</{closing}> does not close <{}>", element.name)));
                }
                return Ok(element);
            } else if rest.starts_with("<!--") {
                self.skip_past("-->", "unterminated comment")?;
            } else if rest.starts_with("<![CDATA[") {
                self.pos += "<![CDATA[".len();
                let text = self.skip_past("]]>", "unterminated CDATA section")?;
                if let Some(bad) = text.chars().find(|&c| !is_xml_char(c)) {
                    return Err(self.err(&format!("character U+{:04X} not allowed", bad as u32)));
                }
                push_text(&mut element, text.to_string());
            } else if rest.starts_with("<?") {
                self.skip_past("?>", "unterminated processing instruction")?;
            } else if rest.starts_with('<') {
                let child = self.element(depth + 1)?;
                element.children.push(Node::Element(child));
            } else {
                let len = rest.find('<').unwrap_or(rest.len());
                let raw = &rest[..len];
                if raw.contains("]]>") {
                    return Err(self.err("']]>' in character data"));
                }
                let text = unescape(raw).map_err(|e| self.err(&e))?;
                self.pos += len;
                push_text(&mut element, text);
            }
        }
    }
}

fn push_text(element: &mut Element, text: String) {
    if let Some(Node::Text(prev)) = element.children.last_mut() {
        prev.push_str(&text);
    } else {
        element.children.push(Node::Text(text));
    }
}

/// Decodes the five predefined entities and numeric character references;
/// rejects a bare `&`, unknown entities and characters XML does not allow.
pub(crate) fn unescape(raw: &str) -> Result<String, String> {
    let mut out = String::with_capacity(raw.len());
    let mut rest = raw;
    while let Some(i) = rest.find(|c: char| c == '&' || !is_xml_char(c)) {
        out.push_str(&rest[..i]);
        let tail = &rest[i..];
        let Some(c) = tail.chars().next() else { break };
        if c != '&' {
            return Err(format!("character U+{:04X} not allowed", c as u32));
        }
        let semi = tail.find(';').filter(|&s| s <= 12).ok_or_else(|| "'&' that does not start an entity".to_string())?;
        let entity = &tail[1..semi];
        let decoded = match entity {
            "amp" => '&',
            "lt" => '<',
            "gt" => '>',
            "quot" => '"',
            "apos" => '\'',
            _ => {
                let code = if let Some(hex) = entity.strip_prefix("#x") {
                    u32::from_str_radix(hex, 16).ok()
                } else if let Some(dec) = entity.strip_prefix('#') {
                    dec.parse::<u32>().ok()
                } else {
                    None
                };
                code.and_then(char::from_u32).filter(|&c| is_xml_char(c)).ok_or_else(|| format!("unknown or invalid entity '&{entity};'"))?
            }
        };
        out.push(decoded);
        rest = &tail[semi + 1..];
    }
    out.push_str(rest);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    const NASTY: &str = "Zoë <Room 2> & \"ICU\" O'Brien — Ünïcødé";

    #[test]
    fn long_or_ampersand_heavy_messages_fit_and_keep_start_and_keypad() {
        let url = "https://w.example/webhooks/twilio/gather?attempt=0b6c2d5e-0000-4000-8000-000000000000";
        for message in ["x".repeat(3950), "&".repeat(800), format!("Room 2 {}", "Zoë & <ICU> ".repeat(600))] {
            let doc = say_and_gather_within(&message, url, 10, 4000).unwrap();
            assert!(doc.chars().count() <= 4000, "{}", doc.chars().count());
            let root = parse_document(&doc).unwrap();
            let gather = root.elements().next().unwrap();
            let says: Vec<String> = gather.elements().map(Element::text).collect();
            assert_eq!(says.len(), 2, "{says:?}");
            assert!(message.starts_with(says[0].trim_end_matches('…')), "start kept");
            assert!(says[0].chars().count() > 500, "most of the room was used: {}", says[0].chars().count());
            assert_eq!(says[1], KEYPAD_INSTRUCTION);
        }
        // A short message is untouched (one Say).
        let doc = say_and_gather_within("Room 2. Press 1.", url, 10, 4000).unwrap();
        assert_eq!(doc, say_and_gather("Room 2. Press 1.", url, 10));
        assert!(say_and_gather_within("x", url, 10, 50).is_none());
    }

    #[test]
    fn control_characters_are_not_spoken() {
        assert_eq!(speakable("a\u{0}b\u{7}c\u{7f}d\u{85}e\nf\tg"), "abcde f g");
        let doc = say_and_gather("Room\u{0} 2\u{1b}[31m", "https://x/g", 5);
        assert!(doc.contains("<Say>Room 2[31m</Say>"), "{doc}");
    }

    /// Checks that escaped text can sit in character data or any quoted
    /// attribute: no raw markup characters, and every `&` starts one of the
    /// five predefined entities.
    fn assert_inert(escaped: &str) {
        assert!(!escaped.contains(['<', '>', '"', '\'']), "{escaped}");
        for (i, _) in escaped.match_indices('&') {
            let tail = &escaped[i..];
            assert!(["&amp;", "&lt;", "&gt;", "&quot;", "&apos;"].iter().any(|e| tail.starts_with(e)), "bare & in {escaped}");
        }
    }

    #[test]
    fn escape_xml_escapes_markup_and_keeps_unicode() {
        let escaped = escape_xml(NASTY);
        assert_eq!(escaped, "Zoë &lt;Room 2&gt; &amp; &quot;ICU&quot; O&apos;Brien — Ünïcødé");
        assert_inert(&escaped);
        assert_eq!(unescape(&escaped).unwrap(), NASTY);
    }

    #[test]
    fn escape_xml_drops_characters_xml_forbids() {
        let input = "a\u{0}b\u{1}c\u{8}d\u{B}e\u{C}f\u{1F}g\tH\nI\rJ\u{FFFE}\u{FFFF}K\u{7F}😀";
        assert_eq!(escape_xml(input), "abcdefg\tH\nI\rJK\u{7F}😀");
    }

    #[test]
    fn say_and_gather_exact_shape() {
        let doc = say_and_gather("Hi", "https://e.example/g?a=1&b=2", 7);
        assert_eq!(
            doc,
            concat!(
                r#"<?xml version="1.0" encoding="UTF-8"?><Response>"#,
                r#"<Gather input="dtmf" numDigits="1" action="https://e.example/g?a=1&amp;b=2" method="POST" timeout="7">"#,
                "<Say>Hi</Say></Gather><Say>No key was pressed. Goodbye.</Say><Hangup/></Response>"
            )
        );
        assert!(say_and_gather("Hi", "https://e.example/g", 0).contains(r#"timeout="1""#));
    }

    #[test]
    fn say_and_gather_round_trips_hostile_text() {
        let url = "https://wardcall.example/twilio/gather?alert=42&token=a\"b'c<d>";
        let doc = say_and_gather(NASTY, url, 10);
        let root = parse_document(&doc).expect("well-formed");
        assert_eq!(root.name, "Response");
        let verbs: Vec<&str> = root.elements().map(|e| e.name.as_str()).collect();
        assert_eq!(verbs, ["Gather", "Say", "Hangup"]);
        let gather = root.elements().next().unwrap();
        assert_eq!(gather.attr("action"), Some(url));
        assert_eq!(gather.attr("input"), Some("dtmf"));
        assert_eq!(gather.attr("numDigits"), Some("1"));
        assert_eq!(gather.attr("method"), Some("POST"));
        assert_eq!(gather.attr("timeout"), Some("10"));
        let say: Vec<&Element> = gather.elements().collect();
        assert_eq!(say.len(), 1);
        assert_eq!(say[0].name, "Say");
        assert_eq!(say[0].text(), NASTY);
        // The raw text between <Say> and </Say> is inert.
        let start = doc.find("<Say>").unwrap() + "<Say>".len();
        let end = doc[start..].find("</Say>").unwrap() + start;
        assert_inert(&doc[start..end]);
    }

    #[test]
    fn say_and_hangup_round_trips() {
        let doc = say_and_hangup(NASTY);
        assert!(doc.starts_with(XML_DECLARATION));
        let root = parse_document(&doc).unwrap();
        let verbs: Vec<&Element> = root.elements().collect();
        assert_eq!(verbs.len(), 2);
        assert_eq!(verbs[0].name, "Say");
        assert_eq!(verbs[0].text(), NASTY);
        assert_eq!(verbs[1].name, "Hangup");
        assert!(verbs[1].children.is_empty());
    }

    #[test]
    fn parser_accepts_common_twiml_forms() {
        let doc = "\u{FEFF}<?xml version='1.0'?>\n<!-- hi -->\n<Response>\n  <Say voice='alice' >A &#233;&#xE9; <![CDATA[<raw & stuff>]]></Say>\n  <Pause length=\"2\"/>\n</Response>\n";
        let root = parse_document(doc).unwrap();
        let say = root.elements().next().unwrap();
        assert_eq!(say.attr("voice"), Some("alice"));
        assert_eq!(say.text(), "A éé <raw & stuff>");
        assert_eq!(root.elements().nth(1).unwrap().attr("length"), Some("2"));
    }

    #[test]
    fn parser_rejects_malformed_documents() {
        for bad in [
            "",
            "hello",
            "<Response>",
            "<Response></Respons>",
            "<Response><Say>a & b</Say></Response>",
            "<Response><Say>a &bogus; b</Say></Response>",
            "<Response><Say>&#0;</Say></Response>",
            "<Response a=\"1\" a=\"2\"/>",
            "<Response a=1/>",
            "<Response a=\"<\"/>",
            "<Response/><Extra/>",
            "<!DOCTYPE x [<!ENTITY a \"b\">]><Response/>",
            "<Response><Say>\u{1}</Say></Response>",
            "<Response><!DOCTYPE x></Response>",
        ] {
            assert!(parse_document(bad).is_err(), "accepted {bad:?}");
        }
        let deep = "<a>".repeat(10_000);
        assert!(parse_document(&deep).is_err());
    }
}
