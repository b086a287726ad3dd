//! Bencode (BEP 3), the crate's only decoder: a validating, allocation-free scanner with
//! the `BENCODE_DEPTH_MAX` cap, read access to the scanned value (`Value` views, and a
//! one-pass `Cursor` for walking trees), and the few writers the encoders need (integers
//! with a small itoa, byte strings). Peer messages (`wire`) and info dicts and .torrent
//! files (`metainfo`) are both read through it.
//!
//! Why not bendy: its `Decoder` rejects dicts whose keys are unsorted, which libtorrent,
//! anacrolix and Transmission all accept (in peer messages and in .torrent files alike),
//! and every `Decoder::new` allocates a 2048-entry state stack (~180 KB), which would sit
//! on the hot path of every ut_metadata request. This scanner accepts any key order and
//! keeps duplicate keys (a `Dict` yields them all); callers that must refuse duplicates
//! check for them. The tests below check it against bendy (a dev-dependency only) on
//! random inputs.

use crate::limits::BENCODE_DEPTH_MAX;

// The scanner keeps "is this level a dict" as one bit per level in a u64.
const _: () = assert!(BENCODE_DEPTH_MAX >= 1 && BENCODE_DEPTH_MAX <= 64);

/// Why a byte string is not one valid bencoded value. Offsets are from the start of the
/// scanned input.
#[derive(thiserror::Error, Debug, Clone, Copy, PartialEq, Eq)]
pub enum BencodeError {
    #[error("bencode ends inside a value (needed bytes past offset {at})")]
    Eof { at: usize },
    #[error("invalid bencode at offset {at}")]
    Syntax { at: usize },
    #[error("bencode nested deeper than {max} at offset {at}", max = BENCODE_DEPTH_MAX)]
    TooDeep { at: usize },
}

/// Length of the one bencoded value at the start of `buf`, after validating all of it:
/// integers in canonical form (no leading zeros, no `-0`), string lengths that fit the
/// input, dict keys that are byte strings, nesting at most `BENCODE_DEPTH_MAX`. Key order
/// is not checked (see module doc). Bytes after the value are not looked at.
pub fn value_len(buf: &[u8]) -> Result<usize, BencodeError> {
    let mut pos = 0usize;
    let mut depth = 0usize;
    // Bit `d - 1` set: the container at depth `d` is a dict.
    let mut dict_levels: u64 = 0;
    // Inside a dict: the next item is a key (else its value). Always false in a list.
    let mut expect_key = false;
    let is_dict = |levels: u64, d: usize| d > 0 && (levels >> (d - 1)) & 1 == 1;
    loop {
        let Some(&b) = buf.get(pos) else {
            return Err(BencodeError::Eof { at: pos });
        };
        if expect_key && b != b'e' && !b.is_ascii_digit() {
            return Err(BencodeError::Syntax { at: pos });
        }
        match b {
            b'e' if depth > 0 => {
                if is_dict(dict_levels, depth) && !expect_key {
                    // A key without its value.
                    return Err(BencodeError::Syntax { at: pos });
                }
                pos += 1;
                depth -= 1;
                if depth == 0 {
                    return Ok(pos);
                }
                // The container just closed was a value of its parent.
                expect_key = is_dict(dict_levels, depth);
                continue;
            }
            b'l' | b'd' => {
                if depth == BENCODE_DEPTH_MAX {
                    return Err(BencodeError::TooDeep { at: pos });
                }
                let bit = 1u64 << depth;
                depth += 1;
                if b == b'd' {
                    dict_levels |= bit;
                } else {
                    dict_levels &= !bit;
                }
                expect_key = b == b'd';
                pos += 1;
                continue;
            }
            b'i' => pos = scan_int(buf, pos + 1, b'e')?,
            b'0'..=b'9' => {
                let (len, body) = scan_len(buf, pos)?;
                pos = match body.checked_add(len) {
                    Some(end) if end <= buf.len() => end,
                    _ => return Err(BencodeError::Eof { at: buf.len() }),
                };
            }
            _ => return Err(BencodeError::Syntax { at: pos }),
        }
        // A scalar was consumed.
        if depth == 0 {
            return Ok(pos);
        }
        if is_dict(dict_levels, depth) {
            expect_key = !expect_key;
        }
    }
}

/// Scans `-?(0|[1-9][0-9]*)` followed by `terminator`, from `pos`; returns the offset
/// after the terminator.
fn scan_int(buf: &[u8], mut pos: usize, terminator: u8) -> Result<usize, BencodeError> {
    let at = |p: usize| buf.get(p).copied().ok_or(BencodeError::Eof { at: p });
    let negative = at(pos)? == b'-';
    if negative {
        pos += 1;
    }
    match at(pos)? {
        b'0' if !negative => pos += 1,
        b'1'..=b'9' => {
            pos += 1;
            while at(pos)?.is_ascii_digit() {
                pos += 1;
            }
        }
        _ => return Err(BencodeError::Syntax { at: pos }),
    }
    if at(pos)? != terminator {
        return Err(BencodeError::Syntax { at: pos });
    }
    Ok(pos + 1)
}

/// Scans a string length `(0|[1-9][0-9]*):` at `pos`; returns (length, offset of the
/// first content byte).
fn scan_len(buf: &[u8], pos: usize) -> Result<(usize, usize), BencodeError> {
    let end = scan_int(buf, pos, b':')?;
    let mut len = 0usize;
    for &d in &buf[pos..end - 1] {
        len = len
            .checked_mul(10)
            .and_then(|l| l.checked_add(usize::from(d - b'0')))
            .ok_or(BencodeError::Syntax { at: pos })?;
    }
    Ok((len, end))
}

/// Validates the value at the start of `buf` and returns a view of it and its length.
pub fn parse_prefix(buf: &[u8]) -> Result<(Value<'_>, usize), BencodeError> {
    let len = value_len(buf)?;
    Ok((Value::of_validated(&buf[..len]), len))
}

/// A view of one validated bencoded value; nothing is copied.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Value<'a> {
    Int(Int<'a>),
    Bytes(&'a [u8]),
    List(List<'a>),
    Dict(Dict<'a>),
}

/// The digits of a validated integer (arbitrary size; convert with `to_i64`/`to_u64`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Int<'a>(&'a [u8]);

/// A validated list: iterate for its items.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct List<'a> {
    raw: &'a [u8],
    /// The items not yet iterated, up to and including the list's closing `e`.
    items: &'a [u8],
}

/// A validated dict: iterate for (key, value) in wire order, duplicates included.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Dict<'a> {
    raw: &'a [u8],
    /// The entries not yet iterated, up to and including the dict's closing `e`.
    items: &'a [u8],
}

impl<'a> Value<'a> {
    /// `v` must be exactly one value that `value_len` accepted.
    fn of_validated(v: &'a [u8]) -> Value<'a> {
        match v.first() {
            Some(b'i') => Value::Int(Int(&v[1..v.len() - 1])),
            Some(b'l') => Value::List(List {
                raw: v,
                items: &v[1..],
            }),
            Some(b'd') => Value::Dict(Dict {
                raw: v,
                items: &v[1..],
            }),
            _ => {
                let colon = v.iter().position(|&b| b == b':').unwrap_or(v.len() - 1);
                Value::Bytes(&v[colon + 1..])
            }
        }
    }

    pub fn as_int(&self) -> Option<Int<'a>> {
        match *self {
            Value::Int(i) => Some(i),
            _ => None,
        }
    }

    pub fn as_bytes(&self) -> Option<&'a [u8]> {
        match *self {
            Value::Bytes(b) => Some(b),
            _ => None,
        }
    }

    pub fn as_dict(&self) -> Option<Dict<'a>> {
        match *self {
            Value::Dict(d) => Some(d),
            _ => None,
        }
    }

    pub fn as_list(&self) -> Option<List<'a>> {
        match *self {
            Value::List(l) => Some(l),
            _ => None,
        }
    }
}

impl<'a> Int<'a> {
    /// The digits as they appear in the input (`-` included), e.g. to quote a value that
    /// does not fit in an error message.
    pub fn digits(self) -> &'a [u8] {
        self.0
    }

    /// The value, or None if it does not fit an i64.
    pub fn to_i64(self) -> Option<i64> {
        let (negative, digits) = match self.0.split_first() {
            Some((b'-', rest)) => (true, rest),
            _ => (false, self.0),
        };
        // Accumulate negatively so that i64::MIN fits.
        let mut n: i64 = 0;
        for &d in digits {
            n = n.checked_mul(10)?.checked_sub(i64::from(d - b'0'))?;
        }
        if negative {
            Some(n)
        } else {
            n.checked_neg()
        }
    }

    /// The value, or None if it is negative or does not fit a u64.
    pub fn to_u64(self) -> Option<u64> {
        let mut n: u64 = 0;
        if self.0.first() == Some(&b'-') {
            return None;
        }
        for &d in self.0 {
            n = n.checked_mul(10)?.checked_add(u64::from(d - b'0'))?;
        }
        Some(n)
    }
}

/// Splits the first validated value off `items` (a container's remaining items, ending in
/// the container's `e`); None at that `e`.
fn next_item<'a>(items: &mut &'a [u8]) -> Option<Value<'a>> {
    if items.first() == Some(&b'e') {
        return None;
    }
    // Already validated as part of the container, so this cannot fail; stopping is the
    // safe answer if it ever did.
    let len = value_len(items).ok()?;
    let (v, rest) = items.split_at(len);
    *items = rest;
    Some(Value::of_validated(v))
}

impl<'a> Iterator for List<'a> {
    type Item = Value<'a>;
    fn next(&mut self) -> Option<Value<'a>> {
        next_item(&mut self.items)
    }
}

impl<'a> Iterator for Dict<'a> {
    type Item = (&'a [u8], Value<'a>);
    fn next(&mut self) -> Option<(&'a [u8], Value<'a>)> {
        let key = next_item(&mut self.items)?.as_bytes()?;
        let value = next_item(&mut self.items)?;
        Some((key, value))
    }
}

impl<'a> List<'a> {
    /// The whole list as it appears in the input, `l` to `e`, however far it was iterated.
    pub fn raw(&self) -> &'a [u8] {
        self.raw
    }

    /// A cursor at the items not yet iterated.
    pub fn cursor(self) -> Cursor<'a> {
        Cursor {
            buf: self.items,
            pos: 0,
        }
    }
}

impl<'a> Dict<'a> {
    /// The first value under `key`.
    pub fn get(self, key: &[u8]) -> Option<Value<'a>> {
        self.into_iter().find(|(k, _)| *k == key).map(|(_, v)| v)
    }

    /// The whole dict as it appears in the input, `d` to `e`, however far it was iterated:
    /// the exact bytes a hash over this value must cover (an info dict's info-hash).
    pub fn raw(&self) -> &'a [u8] {
        self.raw
    }

    /// A cursor at the entries not yet iterated.
    pub fn cursor(self) -> Cursor<'a> {
        Cursor {
            buf: self.items,
            pos: 0,
        }
    }
}

/// One pass through a validated dict or list, for walking trees. Iterating a [`Dict`] or
/// [`List`] scans each item to find where it ends, so walking a tree N levels deep with them
/// scans its leaves N times (a bomb of deep directories costs N× a scan). A cursor instead
/// steps *into* a child container ([`Cursor::enter_dict`], [`Cursor::enter_list`]) and, once
/// the child's items are read to their end, is past it. Values it does not step into are
/// taken whole as views ([`Cursor::next_value`]).
///
/// It only moves through bytes that were validated as one value, so it has no errors: asked
/// for something that is not there (a key in a list, a value past the end) it answers `None`
/// or `false` and does not move.
#[derive(Clone, Copy, Debug)]
pub struct Cursor<'a> {
    /// The container's items from where the cursor started, up to and including its `e`
    /// (nested containers the cursor enters are inside this).
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    /// The next key of the dict the cursor is in, or `None` at the dict's end (after which
    /// the cursor is past its `e`, back in the enclosing container).
    pub fn next_key(&mut self) -> Option<&'a [u8]> {
        match self.buf.get(self.pos)? {
            b'e' => {
                self.pos += 1;
                None
            }
            b'0'..=b'9' => self.take()?.as_bytes(),
            _ => None,
        }
    }

    /// The next item of a list, or the value after a `next_key`, taken whole; `None` at the
    /// container's end (after which the cursor is past its `e`).
    pub fn next_value(&mut self) -> Option<Value<'a>> {
        if self.buf.get(self.pos) == Some(&b'e') {
            self.pos += 1;
            return None;
        }
        self.take()
    }

    /// If the next value is a dict, steps into it: its entries are what `next_key` reads
    /// next. Otherwise does not move and returns false.
    pub fn enter_dict(&mut self) -> bool {
        self.enter(b'd')
    }

    /// If the next value is a list, steps into it: its items are what `next_value` reads
    /// next. Otherwise does not move and returns false.
    pub fn enter_list(&mut self) -> bool {
        self.enter(b'l')
    }

    fn enter(&mut self, kind: u8) -> bool {
        let here = self.buf.get(self.pos) == Some(&kind);
        self.pos += usize::from(here);
        here
    }

    fn take(&mut self) -> Option<Value<'a>> {
        let rest = self.buf.get(self.pos..)?;
        // Validated already, so this cannot fail; not moving is the safe answer if it did.
        let len = value_len(rest).ok()?;
        self.pos += len;
        Some(Value::of_validated(&rest[..len]))
    }
}

/// Number of decimal digits of `n`.
pub fn decimal_len(n: u64) -> usize {
    let mut len = 1;
    let mut n = n / 10;
    while n > 0 {
        len += 1;
        n /= 10;
    }
    len
}

/// Appends `n` in decimal without going through `fmt` (hot path: ut_metadata headers).
pub fn push_decimal(out: &mut Vec<u8>, mut n: u64) {
    let mut digits = [0u8; 20]; // u64::MAX has 20 digits
    let mut i = digits.len();
    loop {
        i -= 1;
        digits[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    out.extend_from_slice(&digits[i..]);
}

/// Appends `i<n>e`.
pub fn push_int(out: &mut Vec<u8>, n: u64) {
    out.push(b'i');
    push_decimal(out, n);
    out.push(b'e');
}

/// Appends `<len>:<bytes>`.
pub fn push_bytes(out: &mut Vec<u8>, bytes: &[u8]) {
    push_decimal(out, bytes.len() as u64);
    out.push(b':');
    out.extend_from_slice(bytes);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::test_rng::XorShift;

    #[test]
    fn scans_valid_values() {
        for (input, len) in [
            (&b"i0e"[..], 3),
            (b"i-42e", 5),
            (b"0:", 2),
            (b"3:abcXYZ", 5),
            (b"le", 2),
            (b"de", 2),
            (b"d1:ai1e1:bl1:xi-1eee", 20),
            (b"d1:bi1e1:ai2eetrailing", 14), // unsorted keys are accepted
            (b"lli1eeei9e", 7),
        ] {
            assert_eq!(
                value_len(input),
                Ok(len),
                "{:?}",
                String::from_utf8_lossy(input)
            );
        }
    }

    #[test]
    fn rejects_invalid_values() {
        for input in [
            &b"i01e"[..],
            b"i-0e",
            b"i-e",
            b"ie",
            b"i1x",
            b"01:a",
            b"-1:a",
            b"e",
            b"x",
            b"di1ei2ee",   // integer key
            b"d1:ae",      // key without value
            b"d1:a1:bi1e", // missing 'e' but also eof
            b"l1:a",
        ] {
            assert!(
                value_len(input).is_err(),
                "{:?}",
                String::from_utf8_lossy(input)
            );
        }
    }

    #[test]
    fn every_prefix_of_a_valid_value_is_eof() {
        let v = b"d1:md11:ut_metadatai3ee13:metadata_sizei20000e1:v4:test4:listli-1e0:deee";
        assert_eq!(value_len(v), Ok(v.len()));
        for n in 0..v.len() {
            assert!(
                matches!(value_len(&v[..n]), Err(BencodeError::Eof { .. })),
                "prefix {n}"
            );
        }
    }

    #[test]
    fn bombs_are_errors_without_big_allocations() {
        let deep = vec![b'l'; 10_000];
        assert!(matches!(
            value_len(&deep),
            Err(BencodeError::TooDeep { .. })
        ));
        let mut ok_deep = vec![b'l'; BENCODE_DEPTH_MAX];
        ok_deep.extend(vec![b'e'; BENCODE_DEPTH_MAX]);
        assert_eq!(value_len(&ok_deep), Ok(2 * BENCODE_DEPTH_MAX));
        let mut too_deep = vec![b'd'; 1];
        too_deep.extend(b"1:a");
        too_deep.extend(vec![b'l'; BENCODE_DEPTH_MAX]);
        assert!(matches!(
            value_len(&too_deep),
            Err(BencodeError::TooDeep { .. })
        ));

        let (v, _) = parse_prefix(b"i99999999999999999999999e").unwrap();
        assert_eq!(v.as_int().unwrap().to_i64(), None);
        assert_eq!(v.as_int().unwrap().to_u64(), None);
        assert!(matches!(
            value_len(b"4294967295:abc"),
            Err(BencodeError::Eof { .. })
        ));
        assert!(matches!(
            value_len(b"18446744073709551615:abc"),
            Err(BencodeError::Eof { .. })
        ));
        assert!(matches!(
            value_len(b"99999999999999999999999999:abc"),
            Err(BencodeError::Syntax { .. })
        ));
    }

    #[test]
    fn integer_conversions() {
        let int = |s: &'static [u8]| parse_prefix(s).unwrap().0.as_int().unwrap();
        assert_eq!(int(b"i9223372036854775807e").to_i64(), Some(i64::MAX));
        assert_eq!(int(b"i-9223372036854775808e").to_i64(), Some(i64::MIN));
        assert_eq!(int(b"i9223372036854775808e").to_i64(), None);
        assert_eq!(int(b"i18446744073709551615e").to_u64(), Some(u64::MAX));
        assert_eq!(int(b"i18446744073709551616e").to_u64(), None);
        assert_eq!(int(b"i-1e").to_u64(), None);
        assert_eq!(int(b"i0e").to_u64(), Some(0));
    }

    #[test]
    fn dict_and_list_views() {
        let (v, len) = parse_prefix(b"d1:ai1e1:ll1:xi2ee1:ad1:bi3eeeZZ").unwrap();
        assert_eq!(len, 30);
        let d = v.as_dict().unwrap();
        assert_eq!(d.count(), 3);
        assert_eq!(d.get(b"a").unwrap().as_int().unwrap().to_i64(), Some(1));
        let l: Vec<_> = d.get(b"l").unwrap().as_list().unwrap().collect();
        assert_eq!(l[0].as_bytes(), Some(&b"x"[..]));
        assert_eq!(l[1].as_int().unwrap().to_u64(), Some(2));
        assert_eq!(d.get(b"zz"), None);
    }

    #[test]
    fn raw_spans_are_the_input_bytes() {
        let input = b"d1:bli1ee4:infod1:zi1e1:a0:e1:ai2eeXX";
        let (v, len) = parse_prefix(input).unwrap();
        assert_eq!(len, input.len() - 2);
        let mut top = v.as_dict().unwrap();
        assert_eq!(top.raw(), &input[..len]);
        let (k, list) = top.next().unwrap();
        assert_eq!(k, b"b");
        let mut list = list.as_list().unwrap();
        assert_eq!(list.raw(), b"li1ee");
        assert!(list.next().is_some() && list.next().is_none());
        assert_eq!(list.raw(), b"li1ee", "iterating does not shrink the span");
        // Unsorted keys inside: the span is still exactly the wire bytes.
        let info = top.get(b"info").unwrap().as_dict().unwrap();
        assert_eq!(info.raw(), b"d1:zi1e1:a0:e");
        let offset = info.raw().as_ptr() as usize - input.as_ptr() as usize;
        assert_eq!(offset, 15);
        assert_eq!(
            top.raw(),
            &input[..len],
            "still the whole dict after next()"
        );
        assert_eq!(
            parse_prefix(b"i-12e").unwrap().0.as_int().unwrap().digits(),
            b"-12"
        );
    }

    #[test]
    fn duplicate_keys_are_kept_in_wire_order() {
        let (v, _) = parse_prefix(b"d1:ai1e1:bi2e1:ai3ee").unwrap();
        let d = v.as_dict().unwrap();
        let values: Vec<_> = d
            .filter(|(k, _)| *k == b"a")
            .map(|(_, v)| v.as_int().unwrap().to_i64().unwrap())
            .collect();
        assert_eq!(values, [1, 3]);
        assert_eq!(d.get(b"a").unwrap().as_int().unwrap().to_i64(), Some(1));
    }

    /// Reads `v` with a cursor, stepping into every container, and writes it back.
    fn rewrite_by_cursor(cur: &mut Cursor<'_>, in_dict: bool, out: &mut Vec<u8>) {
        loop {
            if in_dict {
                match cur.next_key() {
                    Some(k) => push_bytes(out, k),
                    None => break,
                }
            }
            if cur.enter_dict() {
                out.push(b'd');
                rewrite_by_cursor(cur, true, out);
            } else if cur.enter_list() {
                out.push(b'l');
                rewrite_by_cursor(cur, false, out);
            } else {
                match cur.next_value() {
                    Some(Value::Bytes(b)) => push_bytes(out, b),
                    Some(Value::Int(i)) => {
                        out.push(b'i');
                        out.extend_from_slice(i.digits());
                        out.push(b'e');
                    }
                    Some(_) => panic!("containers are entered above"),
                    None => break,
                }
            }
        }
        out.push(b'e');
    }

    #[test]
    fn cursor_walks_every_value_once_and_ends_past_it() {
        let input = b"d1:zli1ed1:bi2e1:alee0:e1:a3:xyz4:deeplllllleeeeee0:i-5ee";
        let (v, len) = parse_prefix(input).unwrap();
        let mut cur = v.as_dict().unwrap().cursor();
        let mut out = b"d".to_vec();
        rewrite_by_cursor(&mut cur, true, &mut out);
        assert_eq!(&out[..], &input[..len]);
        // Past the end: nothing, and no movement.
        assert_eq!(cur.next_key(), None);
        assert_eq!(cur.next_value(), None);
        assert!(!cur.enter_dict() && !cur.enter_list());

        // Mixing: take one value whole, step into the next.
        let (v, _) = parse_prefix(b"d1:ali1ei2ee1:bd1:ci3eee").unwrap();
        let mut cur = v.as_dict().unwrap().cursor();
        assert_eq!(cur.next_key(), Some(&b"a"[..]));
        assert_eq!(cur.next_value().unwrap().as_list().unwrap().count(), 2);
        assert_eq!(cur.next_key(), Some(&b"b"[..]));
        assert!(!cur.enter_list(), "b is a dict");
        assert!(cur.enter_dict());
        assert_eq!(cur.next_key(), Some(&b"c"[..]));
        assert_eq!(
            cur.next_value().unwrap().as_int().unwrap().to_i64(),
            Some(3)
        );
        assert_eq!(cur.next_key(), None, "end of b");
        assert_eq!(cur.next_key(), None, "end of the top dict");

        // A list's cursor, after some items were iterated.
        let (v, _) = parse_prefix(b"li1e1:xle3:yyye").unwrap();
        let mut list = v.as_list().unwrap();
        list.next();
        let mut cur = list.cursor();
        assert_eq!(
            cur.next_key(),
            Some(&b"x"[..]),
            "misuse: a string item reads as a key"
        );
        assert!(cur.enter_list());
        assert_eq!(cur.next_value(), None);
        assert_eq!(cur.next_value().unwrap().as_bytes(), Some(&b"yyy"[..]));
        assert_eq!(cur.next_value(), None);
    }

    #[test]
    fn cursor_never_panics_and_agrees_with_the_views() {
        let mut rng = XorShift::new(0xc0de);
        let alphabet = b"dlie0123456789:-ab";
        let mut walked = 0;
        for _ in 0..100_000 {
            let input: Vec<u8> = (0..rng.below(40))
                .map(|_| alphabet[rng.below(alphabet.len())])
                .collect();
            let Ok((v, len)) = parse_prefix(&input) else {
                continue;
            };
            let mut out = Vec::new();
            match v {
                Value::Dict(d) => {
                    out.push(b'd');
                    rewrite_by_cursor(&mut d.cursor(), true, &mut out);
                }
                Value::List(l) => {
                    out.push(b'l');
                    rewrite_by_cursor(&mut l.cursor(), false, &mut out);
                }
                _ => continue,
            }
            assert_eq!(
                &out[..],
                &input[..len],
                "{:?}",
                String::from_utf8_lossy(&input)
            );
            walked += 1;
            // Random calls in random order never panic and always end.
            let mut cur = match v {
                Value::Dict(d) => d.cursor(),
                Value::List(l) => l.cursor(),
                _ => unreachable!(),
            };
            for _ in 0..50 {
                match rng.below(4) {
                    0 => drop(cur.next_key()),
                    1 => drop(cur.next_value()),
                    2 => drop(cur.enter_dict()),
                    _ => drop(cur.enter_list()),
                }
            }
        }
        assert!(walked > 200, "{walked}");
    }

    #[test]
    fn decimal_writer() {
        for n in [
            0u64,
            1,
            9,
            10,
            99,
            100,
            16383,
            16384,
            u32::MAX as u64,
            u64::MAX,
        ] {
            let mut out = Vec::new();
            push_decimal(&mut out, n);
            assert_eq!(out, n.to_string().as_bytes());
            assert_eq!(decimal_len(n), out.len());
        }
    }

    /// Differential check against bendy: where bendy accepts a value, we must accept it
    /// with the same span; where we accept one with sorted keys, bendy must too.
    #[test]
    fn agrees_with_bendy_on_random_inputs() {
        let alphabet = b"dlie0123456789:-ab";
        let mut rng = XorShift::new(0xbe9c0de);
        let mut accepted = 0;
        for _ in 0..100_000 {
            let len = rng.below(24);
            let input: Vec<u8> = (0..len)
                .map(|_| alphabet[rng.below(alphabet.len())])
                .collect();
            let ours = value_len(&input);
            let theirs = bendy_value_len(&input);
            match (ours, theirs) {
                (Ok(a), Ok(b)) => {
                    assert_eq!(a, b, "{:?}", String::from_utf8_lossy(&input));
                    accepted += 1;
                }
                (Err(_), Ok(_)) => panic!("bendy accepts {:?}", String::from_utf8_lossy(&input)),
                (Ok(_), Err(e)) => {
                    assert!(
                        e.contains("sorted"),
                        "{e} on {:?}",
                        String::from_utf8_lossy(&input)
                    )
                }
                (Err(_), Err(_)) => {}
            }
        }
        assert!(
            accepted > 1000,
            "the generator should produce valid values: {accepted}"
        );
    }

    fn bendy_value_len(input: &[u8]) -> Result<usize, String> {
        use bendy::decoding::{Decoder, Object};
        let mut decoder = Decoder::new(input).with_max_depth(BENCODE_DEPTH_MAX);
        let obj = decoder.next_object().map_err(|e| e.to_string())?;
        let len = match obj {
            None => return Err("empty".into()),
            Some(Object::Integer(s)) => s.len() + 2,
            Some(Object::Bytes(b)) => b.len() + 1 + decimal_len(b.len() as u64),
            Some(Object::List(l)) => l.into_raw().map_err(|e| e.to_string())?.len(),
            Some(Object::Dict(d)) => d.into_raw().map_err(|e| e.to_string())?.len(),
        };
        Ok(len)
    }
}
