//! Tombstones the fleet can trust. A tombstone makes every node delete and block a hash for
//! good, so whoever can write to the bucket could otherwise censor the whole fleet with one
//! object. Each tombstone body carries an HMAC-SHA256 of what it decides (the key and its
//! time) under the fleet key, a secret every node is given by its operator (config file or
//! environment) and that never goes into the bucket. A body without a valid MAC, or whose
//! key or time differ from the object's name, is ignored and counted. Pure functions; the
//! I/O is the tier's.
//!
//! Body (text, one `name=value` per line; only `key`, `at` and `mac` are checked):
//! ```text
//! magnetar tombstone
//! key=<40 hex>
//! at=<unix seconds>
//! node=<host/pid, for the operator>
//! mac=<64 hex: HMAC-SHA256(fleet key, "magnetar-tombstone-v1\n<key hex>\n<at>\n")>
//! ```

use hmac::{KeyInit, Mac};
use sha2::Sha256;

type HmacSha256 = hmac::Hmac<Sha256>;

/// Shortest fleet key accepted: 32 bytes of text, i.e. 128 bits as hex (`openssl rand -hex
/// 32` gives 256). A short key could be searched for from one tombstone in the bucket.
pub const FLEET_KEY_BYTES_MIN: usize = 32;

/// Largest tombstone body read: ours are ~200 bytes; a bucket writer must not make a node
/// download a huge object to look at it.
pub const TOMBSTONE_BYTES_MAX: usize = 1024;

/// What the MAC covers is tagged with the format, so a MAC made for anything else under the
/// same key never verifies here.
const MAC_DOMAIN: &str = "magnetar-tombstone-v1";

/// The fleet's tombstone secret. Not `Debug`-printable: it must not reach a log.
#[derive(Clone, PartialEq, Eq)]
pub struct FleetKey(Vec<u8>);

impl std::fmt::Debug for FleetKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("FleetKey(..)")
    }
}

impl FleetKey {
    /// The key from its text (a file's contents or an environment variable), surrounding
    /// whitespace dropped.
    pub fn from_text(text: &str) -> Result<FleetKey, String> {
        let key = text.trim();
        if key.len() < FLEET_KEY_BYTES_MIN {
            return Err(format!(
                "the fleet key is {} bytes; at least {FLEET_KEY_BYTES_MIN} are needed \
                 (e.g. `openssl rand -hex 32`)",
                key.len()
            ));
        }
        Ok(FleetKey(key.as_bytes().to_vec()))
    }

    fn mac(&self, key: &[u8; 20], at: u64) -> HmacSha256 {
        let mut mac = HmacSha256::new_from_slice(&self.0).expect("HMAC takes any key length");
        mac.update(format!("{MAC_DOMAIN}\n{}\n{at}\n", hex::encode(key)).as_bytes());
        mac
    }
}

/// The body of the tombstone of `key` stamped `at`, written by `node`.
pub fn body(fleet: &FleetKey, key: &[u8; 20], at: u64, node: &str) -> String {
    let mac = hex::encode(fleet.mac(key, at).finalize().into_bytes());
    // `node` is free text from the host name: keep it to one line.
    let node: String = node.chars().filter(|c| !c.is_control()).collect();
    format!(
        "magnetar tombstone\nkey={}\nat={at}\nnode={node}\nmac={mac}\n",
        hex::encode(key)
    )
}

/// Why a tombstone was not trusted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rejected {
    /// No fleet key is configured here: no tombstone can be checked, none is applied.
    NoFleetKey,
    /// Not a tombstone body (no `key`, `at` or `mac` line, or too long).
    Malformed,
    /// The body names another key or time than the object's name.
    NameMismatch,
    /// The MAC does not verify under our fleet key.
    BadMac,
}

impl Rejected {
    pub fn as_str(self) -> &'static str {
        match self {
            Rejected::NoFleetKey => "no fleet key configured",
            Rejected::Malformed => "not a tombstone body",
            Rejected::NameMismatch => "body and object name disagree",
            Rejected::BadMac => "MAC does not verify under the fleet key",
        }
    }
}

/// Check the body of the tombstone object named for `key` (and, for `tomb-log/` names, for
/// `at_in_name`). On success, the time it was stamped.
pub fn verify(
    fleet: Option<&FleetKey>,
    body: &[u8],
    key: &[u8; 20],
    at_in_name: Option<u64>,
) -> Result<u64, Rejected> {
    let fleet = fleet.ok_or(Rejected::NoFleetKey)?;
    if body.len() > TOMBSTONE_BYTES_MAX {
        return Err(Rejected::Malformed);
    }
    let text = std::str::from_utf8(body).map_err(|_| Rejected::Malformed)?;
    let field = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix('='))
            .map(str::trim)
    };
    let (Some(body_key), Some(at), Some(mac)) = (field("key"), field("at"), field("mac")) else {
        return Err(Rejected::Malformed);
    };
    let at: u64 = at.parse().map_err(|_| Rejected::Malformed)?;
    let mac = hex::decode(mac).map_err(|_| Rejected::Malformed)?;
    if body_key != hex::encode(key) || at_in_name.is_some_and(|t| t != at) {
        return Err(Rejected::NameMismatch);
    }
    // `verify_slice` compares in constant time.
    fleet
        .mac(key, at)
        .verify_slice(&mac)
        .map_err(|_| Rejected::BadMac)?;
    Ok(at)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fleet(c: char) -> FleetKey {
        FleetKey::from_text(&c.to_string().repeat(40)).unwrap()
    }

    #[test]
    fn a_tombstone_verifies_under_its_key_and_name_only() {
        let (k, at) = ([7; 20], 1_790_000_000);
        let b = body(&fleet('a'), &k, at, "host/1");
        assert_eq!(
            verify(Some(&fleet('a')), b.as_bytes(), &k, Some(at)),
            Ok(at)
        );
        assert_eq!(verify(Some(&fleet('a')), b.as_bytes(), &k, None), Ok(at));
        // Another fleet's key, no key, another name: refused.
        assert_eq!(
            verify(Some(&fleet('b')), b.as_bytes(), &k, Some(at)),
            Err(Rejected::BadMac)
        );
        assert_eq!(
            verify(None, b.as_bytes(), &k, Some(at)),
            Err(Rejected::NoFleetKey)
        );
        assert_eq!(
            verify(Some(&fleet('a')), b.as_bytes(), &[8; 20], Some(at)),
            Err(Rejected::NameMismatch)
        );
        assert_eq!(
            verify(Some(&fleet('a')), b.as_bytes(), &k, Some(999_999_999_999)),
            Err(Rejected::NameMismatch)
        );
    }

    #[test]
    fn an_edited_body_does_not_verify() {
        let (k, at) = ([7; 20], 1_790_000_000);
        let f = fleet('a');
        let b = body(&f, &k, at, "host/1");
        // Moved to another time, with the name to match: the MAC covers the time.
        let later = b.replace("at=1790000000", "at=1790000001");
        assert_eq!(
            verify(Some(&f), later.as_bytes(), &k, Some(at + 1)),
            Err(Rejected::BadMac)
        );
        // Moved to another key: the MAC covers the key.
        let other = b.replace(&hex::encode(k), &hex::encode([9; 20]));
        assert_eq!(
            verify(Some(&f), other.as_bytes(), &[9; 20], Some(at)),
            Err(Rejected::BadMac)
        );
        // The old unauthenticated format, and junk.
        let old = format!(
            "magnetar tombstone\nkey={}\nat={at}\nnode=x\n",
            hex::encode(k)
        );
        assert_eq!(
            verify(Some(&f), old.as_bytes(), &k, Some(at)),
            Err(Rejected::Malformed)
        );
        assert_eq!(
            verify(Some(&f), b"\xff\xfe", &k, None),
            Err(Rejected::Malformed)
        );
        let long = format!("{b}{}", "x".repeat(TOMBSTONE_BYTES_MAX));
        assert_eq!(
            verify(Some(&f), long.as_bytes(), &k, None),
            Err(Rejected::Malformed)
        );
        // The node line cannot add lines.
        let sneaky = body(&f, &k, at, "h\nmac=00");
        assert_eq!(verify(Some(&f), sneaky.as_bytes(), &k, Some(at)), Ok(at));
    }

    #[test]
    fn short_fleet_keys_are_refused_and_never_printed() {
        assert!(FleetKey::from_text("  short  ").is_err());
        assert!(FleetKey::from_text(&"k".repeat(FLEET_KEY_BYTES_MIN)).is_ok());
        let k = FleetKey::from_text(&"secret".repeat(8)).unwrap();
        assert!(!format!("{k:?}").contains("secret"));
    }
}
