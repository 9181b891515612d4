//! Rewrites the `<text>` elements plotters' SVG backend writes as `<path>`s of glyph outlines,
//! so that exported SVGs need no font to view, print or place in a paper.
//!
//! plotters writes each label as
//! `<text x=".." y=".." dy=".." text-anchor=".." font-family=".." font-size=".." opacity=".."
//! fill=".." [transform="rotate(a, x, y)"]>\nESCAPED TEXT\n</text>`.
//! Each becomes `<path aria-label="TEXT" d=".." fill=".." opacity=".."/>`, laid out by
//! [`super::font`] (the same layout the PNG export rasterises), so text keeps its position,
//! anchor, size, colour and rotation, and stays searchable through `aria-label`. A `rotate`
//! transform is applied to the coordinates, since some renderers (ImageMagick's) place
//! `rotate(a, cx, cy)` wrongly; any other transform is copied as it is.

use std::fmt::Write as _;

use plotters::style::text_anchor::HPos;

use super::font::{self, Dy, Rotation};

/// Replaces every `<text>…</text>` element of `svg` with a `<path>` of its glyph outlines.
/// Text with no visible glyph (only spaces) is dropped.
pub(crate) fn text_to_paths(svg: &str) -> crate::Result<String> {
    let mut out = String::with_capacity(svg.len() * 2);
    let mut rest = svg;
    while let Some(start) = find_text_open(rest) {
        out.push_str(&rest[..start]);
        let after_name = &rest[start + "<text".len()..];
        let (attrs, self_closing, after_tag) =
            parse_attributes(after_name).ok_or_else(|| malformed("a <text> tag is not closed"))?;
        let (content, after_element) = if self_closing {
            (String::new(), after_tag)
        } else {
            let end = after_tag
                .find("</text>")
                .ok_or_else(|| malformed("a <text> element has no </text>"))?;
            (
                unescape(&after_tag[..end]),
                &after_tag[end + "</text>".len()..],
            )
        };
        let content = content.strip_prefix('\n').unwrap_or(&content);
        let content = content.strip_suffix('\n').unwrap_or(content);
        write_path(&mut out, &attrs, content);
        // plotters ends each element with a newline, and so does the path written for it.
        rest = after_element.strip_prefix('\n').unwrap_or(after_element);
    }
    out.push_str(rest);
    Ok(out)
}

fn malformed(message: &str) -> crate::Error {
    crate::Error::invalid("SVG", message)
}

/// Byte offset of the next `<text` tag (not `<textPath` and the like).
fn find_text_open(s: &str) -> Option<usize> {
    let mut from = 0;
    while let Some(i) = s[from..].find("<text") {
        let at = from + i;
        let next = s[at + "<text".len()..].chars().next();
        if matches!(next, Some(c) if c.is_whitespace() || c == '>' || c == '/') {
            return Some(at);
        }
        from = at + "<text".len();
    }
    None
}

/// One attribute: its name and its raw (still escaped) value.
type Attr<'a> = (&'a str, &'a str);

/// Parses `name="value"` pairs up to the end of the tag. Returns the attributes, whether the
/// tag was self-closing, and the text after the tag.
fn parse_attributes(s: &str) -> Option<(Vec<Attr<'_>>, bool, &str)> {
    let mut attrs = Vec::new();
    let mut rest = s;
    loop {
        rest = rest.trim_start();
        if let Some(after) = rest.strip_prefix("/>") {
            return Some((attrs, true, after));
        }
        if let Some(after) = rest.strip_prefix('>') {
            return Some((attrs, false, after));
        }
        let eq = rest.find('=')?;
        let name = rest[..eq].trim();
        let after_eq = rest[eq + 1..].trim_start();
        let quote = after_eq.chars().next().filter(|&c| c == '"' || c == '\'')?;
        let body = &after_eq[1..];
        let close = body.find(quote)?;
        attrs.push((name, &body[..close]));
        rest = &body[close + 1..];
    }
}

fn attr<'a>(attrs: &[Attr<'a>], name: &str) -> Option<&'a str> {
    attrs.iter().find(|(n, _)| *n == name).map(|(_, v)| *v)
}

/// Leading number of an attribute value such as `12.5`, `0.76em` or `-0.5ex`, and its unit.
fn number_and_unit(value: &str) -> Option<(f64, &str)> {
    let value = value.trim();
    let bytes = value.as_bytes();
    let mut end = usize::from(matches!(bytes.first(), Some(b'-' | b'+')));
    while bytes
        .get(end)
        .is_some_and(|b| b.is_ascii_digit() || *b == b'.')
    {
        end += 1;
    }
    // An exponent only when digits follow, so that `2em` keeps its unit.
    if matches!(bytes.get(end), Some(b'e' | b'E')) {
        let mut exp = end + 1;
        if matches!(bytes.get(exp), Some(b'-' | b'+')) {
            exp += 1;
        }
        if bytes.get(exp).is_some_and(u8::is_ascii_digit) {
            end = exp;
            while bytes.get(end).is_some_and(u8::is_ascii_digit) {
                end += 1;
            }
        }
    }
    let number = value[..end].parse::<f64>().ok()?;
    number.is_finite().then_some((number, value[end..].trim()))
}

fn write_path(out: &mut String, attrs: &[Attr<'_>], text: &str) {
    let length = |name: &str| {
        let value = unescape(attr(attrs, name)?);
        number_and_unit(&value).map(|(n, unit)| (n, unit.to_owned()))
    };
    let num = |name: &str, default: f64| length(name).map_or(default, |(n, _)| n);
    let em = num("font-size", 16.0);
    let (x, y) = (num("x", 0.0), num("y", 0.0));
    let dy = length("dy").map_or(Dy::Units(0.0), |(n, unit)| match unit.as_str() {
        "em" => Dy::Em(n),
        "ex" => Dy::Ex(n),
        _ => Dy::Units(n),
    });
    let h_pos = match attr(attrs, "text-anchor").map(unescape).as_deref() {
        Some("middle") => HPos::Center,
        Some("end") => HPos::Right,
        _ => HPos::Left,
    };
    let raw_transform = attr(attrs, "transform");
    let rotation = raw_transform.and_then(|t| parse_rotate(&unescape(t)));
    let d = font::svg_path_data(text, em, (x, y), (h_pos, dy), rotation);
    if d.is_empty() {
        return;
    }
    out.push_str("<path aria-label=\"");
    escape_into(out, text);
    let _ = write!(out, "\" d=\"{d}\"");
    // Values are copied still escaped, exactly as they were written.
    for name in ["fill", "opacity"] {
        if let Some(value) = attr(attrs, name) {
            let _ = write!(out, " {name}=\"{value}\"");
        }
    }
    if let (Some(transform), None) = (raw_transform, rotation) {
        let _ = write!(out, " transform=\"{transform}\"");
    }
    out.push_str("/>\n");
}

/// Parses a lone `rotate(a)` or `rotate(a, cx, cy)` transform.
fn parse_rotate(transform: &str) -> Option<Rotation> {
    let args = transform
        .trim()
        .strip_prefix("rotate")?
        .trim_start()
        .strip_prefix('(')?;
    let args = args.strip_suffix(')')?;
    let numbers: Vec<f64> = args
        .split(|c: char| c == ',' || c.is_whitespace())
        .filter(|s| !s.is_empty())
        .map(str::parse)
        .collect::<Result<_, _>>()
        .ok()?;
    match numbers.as_slice() {
        [degrees] => Some(Rotation {
            degrees: *degrees,
            center: (0.0, 0.0),
        }),
        [degrees, cx, cy] => Some(Rotation {
            degrees: *degrees,
            center: (*cx, *cy),
        }),
        _ => None,
    }
}

/// Decodes the five predefined XML entities and numeric character references.
pub(crate) fn unescape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(amp) = rest.find('&') {
        out.push_str(&rest[..amp]);
        let tail = &rest[amp..];
        let decoded = tail.find(';').filter(|&semi| semi <= 12).and_then(|semi| {
            let entity = &tail[1..semi];
            let c = match entity {
                "amp" => Some('&'),
                "lt" => Some('<'),
                "gt" => Some('>'),
                "quot" => Some('"'),
                "apos" => Some('\''),
                _ => entity
                    .strip_prefix("#x")
                    .or_else(|| entity.strip_prefix("#X"))
                    .and_then(|hex| u32::from_str_radix(hex, 16).ok())
                    .or_else(|| entity.strip_prefix('#').and_then(|dec| dec.parse().ok()))
                    .and_then(char::from_u32),
            };
            c.map(|c| (c, semi))
        });
        if let Some((c, semi)) = decoded {
            out.push(c);
            rest = &tail[semi + 1..];
        } else {
            out.push('&');
            rest = &tail[1..];
        }
    }
    out.push_str(rest);
    out
}

/// Escapes `s` for an XML attribute value, dropping characters XML cannot hold.
pub(crate) fn escape_into(out: &mut String, s: &str) {
    for c in s.chars() {
        match c {
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '&' => out.push_str("&amp;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&apos;"),
            '\t' | '\n' | '\r' => out.push(' '),
            c if c.is_control() => {}
            c => out.push(c),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rewrites_plotters_text() {
        let svg = "<svg width=\"10\" height=\"10\">\n<text x=\"5\" y=\"6\" dy=\"0.76em\" \
                   text-anchor=\"middle\" font-family=\"sans-serif\" font-size=\"12\" \
                   opacity=\"1\" fill=\"#1A1A1A\" transform=\"rotate(270, 5, 6)\">\n\
                   a &lt;b&gt; &amp; &quot;c&apos;\n</text>\n<rect/>\n</svg>\n";
        let out = text_to_paths(svg).unwrap();
        assert!(!out.contains("<text"));
        assert!(out.contains("<path aria-label=\"a &lt;b&gt; &amp; &quot;c&apos;\" d=\"M"));
        assert!(out.contains("fill=\"#1A1A1A\" opacity=\"1\"/>\n<rect/>"));
        let skewed = svg.replace("rotate(270, 5, 6)", "skewX(3)");
        assert!(text_to_paths(&skewed)
            .unwrap()
            .contains(" transform=\"skewX(3)\"/>"));
    }

    #[test]
    fn blank_and_self_closing_text_vanish() {
        let out = text_to_paths("<g><text x=\"1\">\n  \n</text>\n<text/><textPath/></g>").unwrap();
        assert_eq!(out, "<g><textPath/></g>");
    }

    #[test]
    fn unterminated_text_is_an_error() {
        assert!(text_to_paths("<svg><text x=\"1\">abc</svg>").is_err());
        assert!(text_to_paths("<svg><text x=\"1\"").is_err());
    }

    #[test]
    fn entities_and_numbers() {
        assert_eq!(
            unescape("&amp;lt; &#65;&#x42; & &bogus;"),
            "&lt; AB & &bogus;"
        );
        assert_eq!(number_and_unit("0.76em"), Some((0.76, "em")));
        assert_eq!(number_and_unit("-0.5ex"), Some((-0.5, "ex")));
        assert_eq!(number_and_unit("12.5"), Some((12.5, "")));
        assert_eq!(number_and_unit("1e2"), Some((100.0, "")));
        assert_eq!(number_and_unit("em"), None);
        let r = parse_rotate("rotate(270, 5, 6)").unwrap();
        assert_eq!((r.degrees, r.center), (270.0, (5.0, 6.0)));
        assert_eq!(parse_rotate(" rotate( 90 ) ").unwrap().center, (0.0, 0.0));
        assert!(parse_rotate("rotate(1, 2)").is_none());
        assert!(parse_rotate("translate(1, 2)").is_none());
    }
}
