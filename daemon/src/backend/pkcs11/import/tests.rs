//! Against real SoftHSM2, on the process's shared token (see `softhsm::test_token`), each test
//! with its own labels. Key material is wrapped as a customer would, outside kekd, with the
//! `openssl` command line; that the imported key is the customer's key is proven with KEKs
//! sealed by `Pkcs11RootKey` and opened with AES-256-GCM in the test, and the reverse.

use std::io::Write as _;
use std::process::{Command, Stdio};

use aws_lc_rs::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM};
use cryptoki::session::Session;

use super::*;
// `with_admin`: the test token as another application sees it. While its lock is held, no
// import is under way in this process: each holds the lock from login until its session
// is closed.
use crate::backend::pkcs11::tests::with_admin;
use crate::backend::pkcs11::{find_keys, Pkcs11RootKey, IV_LEN, SEALED_LEN};
use crate::backend::RootKey;
use crate::softhsm::test_token::shared;

const AAD: &[u8] = b"kekd/kek/v1 acme payments 1";

fn config(key_label: &str) -> Pkcs11Config {
    let t = &shared().token;
    Pkcs11Config {
        module: t.module.clone(),
        token_label: t.token_label.clone(),
        key_label: key_label.to_owned(),
        pin_file: Some(t.pin_file.clone()),
        pin_env: None,
        create_root_key: false,
        softhsm2_conf: Some(t.conf.clone()),
        module_env: Default::default(),
        allow_exportable_root: false,
        max_sessions: crate::config::DEFAULT_MAX_SESSIONS,
        call_timeout: std::time::Duration::from_secs(5),
    }
}

fn pin() -> Zeroizing<String> {
    config("").read_pin("test").unwrap()
}

fn importer() -> Importer {
    Importer::open("test", &config(""), pin(), &shared().lock_dir()).unwrap()
}

fn random(len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    aws_lc_rs::rand::fill(&mut v).unwrap();
    v
}

fn openssl(args: &[&str], stdin: &[u8]) -> Vec<u8> {
    let mut child = Command::new("openssl")
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run openssl");
    child.stdin.take().unwrap().write_all(stdin).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "openssl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    out.stdout
}

/// Wraps `key` under the PEM public key the way a customer would, with the openssl command
/// line; for the RSA-AES layout under a fresh ephemeral AES key of `ephemeral_len` bytes.
fn wrap_with_openssl(pem: &str, algorithm: WrappingAlgorithm, key: &[u8], ephemeral_len: usize) -> Vec<u8> {
    let dir = tempfile::tempdir().unwrap();
    let public = dir.path().join("pub.pem");
    std::fs::write(&public, pem).unwrap();
    let public = public.to_str().unwrap();
    let md = match algorithm.hash() {
        OaepHash::Sha256 => "sha256",
        OaepHash::Sha1 => "sha1",
    };
    let (oaep_md, mgf1_md) = (format!("rsa_oaep_md:{md}"), format!("rsa_mgf1_md:{md}"));
    let rsa_oaep = |plain: &[u8]| {
        openssl(
            &[
                "pkeyutl",
                "-encrypt",
                "-pubin",
                "-inkey",
                public,
                "-pkeyopt",
                "rsa_padding_mode:oaep",
                "-pkeyopt",
                &oaep_md,
                "-pkeyopt",
                &mgf1_md,
            ],
            plain,
        )
    };
    if !algorithm.is_rsa_aes() {
        return rsa_oaep(key);
    }
    let ephemeral = random(ephemeral_len);
    let mut wrapped = rsa_oaep(&ephemeral);
    let cipher = format!("-id-aes{}-wrap-pad", ephemeral_len * 8);
    // RFC 5649's alternative initial value, as openssl's `enc` wants it spelled.
    wrapped.extend(openssl(&["enc", &cipher, "-K", &hex::encode(&ephemeral), "-iv", "A65959A6"], key));
    wrapped
}

/// Proves that the root key labelled `label` is `key`: a KEK sealed by kekd opens with
/// AES-256-GCM under `key` in the test, and one sealed in the test unseals in kekd.
fn assert_serves_with(label: &str, key: &[u8]) {
    let root = Pkcs11RootKey::open("test", &config(label), pin(), &shared().lock_dir(), None).unwrap();
    let gcm = LessSafeKey::new(UnboundKey::new(&AES_256_GCM, key).unwrap());

    let kek: [u8; KEK_LEN] = random(KEK_LEN).try_into().unwrap();
    let sealed = root.seal(AAD, &kek).unwrap();
    assert_eq!(sealed.len(), SEALED_LEN);
    let (iv, sealed_ct) = sealed.split_at(IV_LEN);
    let mut buf = sealed_ct.to_vec();
    let nonce = Nonce::try_assume_unique_for_key(iv).unwrap();
    let opened = gcm.open_in_place(nonce, Aad::from(AAD), &mut buf).expect("kekd sealed under the known key");
    assert_eq!(opened, &kek[..]);

    let kek: [u8; KEK_LEN] = random(KEK_LEN).try_into().unwrap();
    let iv = random(IV_LEN);
    let mut buf = kek.to_vec();
    let nonce = Nonce::try_assume_unique_for_key(&iv).unwrap();
    gcm.seal_in_place_append_tag(nonce, Aad::from(AAD), &mut buf).unwrap();
    let mut out = [0u8; KEK_LEN];
    root.unseal(AAD, &[iv, buf].concat(), &mut out).unwrap();
    assert_eq!(out, kek);
}

fn token_objects_labelled(label: &str) -> usize {
    with_admin(|s| {
        s.find_objects(&[Attribute::Token(true), Attribute::Label(label.as_bytes().to_vec())]).unwrap().len()
    })
}

/// Session secret keys of this process: an ephemeral key left behind would show here.
fn session_secret_keys() -> usize {
    with_admin(|s| {
        s.find_objects(&[Attribute::Token(false), Attribute::Class(ObjectClass::SECRET_KEY)]).unwrap().len()
    })
}

fn config_error(err: BackendError) -> String {
    let BackendError::Config(msg) = err else { panic!("expected a Config error, got {err:?}") };
    msg
}

fn bools(s: &Session, key: ObjectHandle, types: &[AttributeType]) -> Vec<(AttributeType, bool)> {
    let attrs = s.get_attributes(key, types).unwrap();
    assert_eq!(attrs.len(), types.len(), "{attrs:?}");
    attrs
        .into_iter()
        .map(|a| {
            let value = match a {
                Attribute::Token(b)
                | Attribute::Private(b)
                | Attribute::Sensitive(b)
                | Attribute::Extractable(b)
                | Attribute::NeverExtractable(b)
                | Attribute::AlwaysSensitive(b)
                | Attribute::Local(b)
                | Attribute::Modifiable(b)
                | Attribute::Encrypt(b)
                | Attribute::Decrypt(b)
                | Attribute::Wrap(b)
                | Attribute::Unwrap(b)
                | Attribute::Sign(b)
                | Attribute::SignRecover(b)
                | Attribute::Verify(b)
                | Attribute::VerifyRecover(b)
                | Attribute::Derive(b) => b,
                other => panic!("not a boolean: {other:?}"),
            };
            (a.attribute_type(), value)
        })
        .collect()
}

fn assert_bools(s: &Session, key: ObjectHandle, want: &[(AttributeType, bool)]) {
    let types: Vec<_> = want.iter().map(|(t, _)| *t).collect();
    assert_eq!(bools(s, key, &types), want);
}

/// The imported key has the attributes of a root key that kekd generates. CKA_LOCAL,
/// CKA_ALWAYS_SENSITIVE and CKA_NEVER_EXTRACTABLE are false as they must be for an unwrapped
/// key (its value existed outside the token); SoftHSM 2.6.1 reports exactly that.
fn assert_imported_attributes(label: &str) {
    use AttributeType as A;
    with_admin(|s| {
        let [key] = find_keys(s, label).unwrap()[..] else { panic!("exactly one AES key {label:?}") };
        assert_bools(
            s,
            key,
            &[
                (A::Token, true),
                (A::Private, true),
                (A::Sensitive, true),
                (A::Extractable, false),
                (A::Encrypt, true),
                (A::Decrypt, true),
                (A::Wrap, false),
                (A::Unwrap, false),
                (A::Sign, false),
                (A::Verify, false),
                (A::Derive, false),
                (A::Modifiable, false),
                (A::Local, false),
                (A::AlwaysSensitive, false),
                (A::NeverExtractable, false),
            ],
        );
        // SoftHSM 2.6.1 leaves CKA_VALUE_LEN at 0 on unwrap (it sets CKA_VALUE only); a token
        // that records it must say 32. `assert_serves_with` proved the value is the key.
        let len = s.get_attributes(key, &[A::ValueLen]).unwrap();
        assert!(
            matches!(len[..], [Attribute::ValueLen(n)] if [0, KEK_LEN].contains(&usize::from(n))),
            "{len:?}"
        );
        let value = s.get_attributes(key, &[A::Value]).unwrap();
        assert!(value.is_empty(), "the key value cannot be read: {value:?}");
    });
}

/// Imports a fresh random key under `label` and proves it serves.
fn import_and_serve(imp: &Importer, label: &str, algorithm: WrappingAlgorithm, ephemeral_len: usize) {
    let transport = imp.transport_key(label).unwrap();
    let key = random(KEK_LEN);
    let wrapped = wrap_with_openssl(&transport.pem, algorithm, &key, ephemeral_len);
    assert_eq!(wrapped.len(), algorithm.wrapped_len(384));
    imp.import_root_key(label, algorithm, &wrapped).unwrap();
    assert_serves_with(label, &key);
    assert_imported_attributes(label);
    assert_eq!(session_secret_keys(), 0, "the ephemeral key is gone");
}

#[test]
fn import_transport_key_is_found_again_with_the_same_pem() {
    use AttributeType as A;
    let imp = importer();
    let first = imp.transport_key("i-transport").unwrap();
    assert!(first.created);
    assert_eq!(first.label, "i-transport-transport");
    assert_eq!(first.bits, 3072);
    assert!(first.pem.starts_with("-----BEGIN PUBLIC KEY-----\n"), "{}", first.pem);
    assert!(first.pem.ends_with("\n-----END PUBLIC KEY-----\n"), "{}", first.pem);

    let again = imp.transport_key("i-transport").unwrap();
    assert!(!again.created);
    assert_eq!(again.pem, first.pem);
    assert_eq!(again.sha256, first.sha256);
    // Another importer (another worker, after a restart) finds it too.
    assert_eq!(importer().transport_key("i-transport").unwrap().pem, first.pem);

    // openssl reads it, writes it back byte for byte, and agrees on the fingerprint.
    let text =
        String::from_utf8(openssl(&["pkey", "-pubin", "-noout", "-text_pub"], first.pem.as_bytes())).unwrap();
    assert!(text.contains("Public-Key: (3072 bit)") && text.contains("Exponent: 65537"), "{text}");
    assert_eq!(
        String::from_utf8(openssl(&["pkey", "-pubin", "-pubout"], first.pem.as_bytes())).unwrap(),
        first.pem
    );
    let der = openssl(&["pkey", "-pubin", "-outform", "DER"], first.pem.as_bytes());
    let digest = String::from_utf8(openssl(&["dgst", "-sha256", "-r"], &der)).unwrap();
    assert_eq!(digest.split_whitespace().next(), Some(first.sha256.as_str()));

    with_admin(|s| {
        let find = |class| {
            s.find_objects(&[Attribute::Class(class), Attribute::Label(b"i-transport-transport".to_vec())])
                .unwrap()
        };
        let ([private], [public]) = (&find(ObjectClass::PRIVATE_KEY)[..], &find(ObjectClass::PUBLIC_KEY)[..])
        else {
            panic!("exactly one pair")
        };
        assert_bools(
            s,
            *private,
            &[
                (A::Token, true),
                (A::Private, true),
                (A::Sensitive, true),
                (A::Extractable, false),
                (A::NeverExtractable, true),
                (A::AlwaysSensitive, true),
                (A::Local, true),
                (A::Unwrap, true),
                (A::Decrypt, false),
                (A::Sign, false),
                (A::SignRecover, false),
                (A::Derive, false),
                (A::Modifiable, false),
            ],
        );
        assert_bools(
            s,
            *public,
            &[
                (A::Token, true),
                (A::Private, false),
                (A::Encrypt, true),
                (A::Wrap, true),
                (A::Verify, false),
                (A::VerifyRecover, false),
                (A::Derive, false),
                (A::Modifiable, false),
            ],
        );
    });
}

#[test]
fn import_transport_key_first_calls_at_once_make_one_pair() {
    let threads: Vec<_> =
        (0..3).map(|_| std::thread::spawn(|| importer().transport_key("i-race").unwrap())).collect();
    let keys: Vec<_> = threads.into_iter().map(|t| t.join().unwrap()).collect();
    assert_eq!(keys.iter().filter(|k| k.created).count(), 1, "{keys:?}");
    assert!(keys.iter().all(|k| k.pem == keys[0].pem));
    assert_eq!(token_objects_labelled("i-race-transport"), 2, "one private and one public key");
}

/// SoftHSM 2.6.1 accepts RSA-OAEP with SHA-1 only, and has CKM_AES_KEY_WRAP_PAD.
#[test]
fn import_transport_key_lists_what_the_token_accepts() {
    let t = &shared().token;
    let info = library(&t.module, Some(&t.conf)).unwrap().get_library_info().unwrap();
    let algorithms = importer().transport_key("i-algorithms").unwrap().algorithms;
    let version = info.library_version();
    if info.manufacturer_id().contains("SoftHSM") && (version.major(), version.minor()) <= (2, 6) {
        assert_eq!(algorithms, [WrappingAlgorithm::RsaesOaepSha1, WrappingAlgorithm::RsaAesKeyWrapSha1]);
    } else {
        assert!(algorithms.contains(&WrappingAlgorithm::RsaesOaepSha1), "{algorithms:?}");
    }
    assert_eq!(session_secret_keys(), 0, "the probes leave nothing");
}

#[test]
fn import_rsaes_oaep_sha1_serves_with_the_customer_key() {
    import_and_serve(&importer(), "i-oaep-sha1", WrappingAlgorithm::RsaesOaepSha1, 0);
}

#[test]
fn import_rsa_aes_key_wrap_sha1_serves_with_the_customer_key() {
    import_and_serve(&importer(), "i-rsa-aes-sha1", WrappingAlgorithm::RsaAesKeyWrapSha1, 32);
}

#[test]
fn import_rsa_aes_key_wrap_takes_every_aes_ephemeral_size() {
    let imp = importer();
    for len in [16, 24] {
        import_and_serve(&imp, &format!("i-ephemeral-{len}"), WrappingAlgorithm::RsaAesKeyWrapSha1, len);
    }
}

/// The SHA-256 algorithms round-trip where the token accepts them and are refused, naming
/// the SHA-1 alternative and creating nothing, where it does not (SoftHSM 2.6.1).
#[test]
fn import_sha256_algorithms_serve_or_are_refused_by_name() {
    let imp = importer();
    for (label, algorithm) in [
        ("i-oaep-sha256", WrappingAlgorithm::RsaesOaepSha256),
        ("i-rsa-aes-sha256", WrappingAlgorithm::RsaAesKeyWrapSha256),
    ] {
        let transport = imp.transport_key(label).unwrap();
        if transport.algorithms.contains(&algorithm) {
            import_and_serve(&imp, label, algorithm, 32);
            continue;
        }
        let key = random(KEK_LEN);
        let wrapped = wrap_with_openssl(&transport.pem, algorithm, &key, 32);
        let msg = config_error(imp.import_root_key(label, algorithm, &wrapped).unwrap_err());
        let sha1 = algorithm.with_sha1().name();
        assert!(
            msg.contains(&format!("does not accept the RSA-OAEP parameters of {algorithm}"))
                && msg.contains("CKR_ARGUMENTS_BAD")
                && msg.contains(&format!("wrap the key material with {sha1} instead")),
            "{msg}"
        );
        assert_eq!(token_objects_labelled(label), 0);
        // What the message says works.
        let wrapped = wrap_with_openssl(&transport.pem, algorithm.with_sha1(), &key, 32);
        imp.import_root_key(label, algorithm.with_sha1(), &wrapped).unwrap();
        assert_serves_with(label, &key);
    }
}

#[test]
fn import_tampered_material_is_refused_and_creates_nothing() {
    let imp = importer();
    let other = imp.transport_key("i-tampered-other").unwrap();
    for (label, algorithm) in [
        ("i-tampered-oaep", WrappingAlgorithm::RsaesOaepSha1),
        ("i-tampered-rsa-aes", WrappingAlgorithm::RsaAesKeyWrapSha1),
    ] {
        let transport = imp.transport_key(label).unwrap();
        let key = random(KEK_LEN);
        let wrapped = wrap_with_openssl(&transport.pem, algorithm, &key, 32);
        let mut cases = vec![
            ("a flipped bit in the RSA part", wrapped.clone(), "RSA-OAEP decryption"),
            (
                "another transport key",
                wrap_with_openssl(&other.pem, algorithm, &key, 32),
                "RSA-OAEP decryption",
            ),
        ];
        if algorithm.is_rsa_aes() {
            for at in [384, wrapped.len() - 1] {
                cases.push(("a flipped bit in the KWP part", wrapped.clone(), "integrity check"));
                cases.last_mut().unwrap().1[at] ^= 0x01;
            }
        }
        cases[0].1[100] ^= 0x01;
        for (what, bad, why) in cases {
            let msg = config_error(imp.import_root_key(label, algorithm, &bad).unwrap_err());
            assert!(
                msg.starts_with(&format!("the {algorithm} key material does not unwrap: "))
                    && msg.contains(why),
                "{what}: {msg}"
            );
            assert!(!msg.contains(&hex::encode(&key)), "{msg}");
            assert_eq!(token_objects_labelled(label), 0, "{what}");
        }
        assert_eq!(session_secret_keys(), 0);
        // Nothing was left under the label: the untouched material imports.
        imp.import_root_key(label, algorithm, &wrapped).unwrap();
        assert_serves_with(label, &key);
    }
}

#[test]
fn import_wrong_length_is_refused() {
    let imp = importer();
    imp.transport_key("i-length").unwrap();
    for (algorithm, len, expected) in [
        (WrappingAlgorithm::RsaesOaepSha1, 0, 384),
        (WrappingAlgorithm::RsaesOaepSha1, 383, 384),
        (WrappingAlgorithm::RsaesOaepSha1, 385, 384),
        (WrappingAlgorithm::RsaesOaepSha256, 512, 384),
        (WrappingAlgorithm::RsaAesKeyWrapSha1, 384, 424),
        (WrappingAlgorithm::RsaAesKeyWrapSha1, 423, 424),
        (WrappingAlgorithm::RsaAesKeyWrapSha256, 432, 424),
    ] {
        let msg = config_error(imp.import_root_key("i-length", algorithm, &vec![0x5a; len]).unwrap_err());
        assert!(
            msg.starts_with(&format!(
                "wrapped key material is {len} bytes, but {algorithm} of a 32-byte key"
            )) && msg.contains(&format!("is {expected} bytes")),
            "{msg}"
        );
    }
    // The length of the other layout says so.
    let msg = config_error(
        imp.import_root_key("i-length", WrappingAlgorithm::RsaesOaepSha1, &[0x5a; 424]).unwrap_err(),
    );
    assert!(msg.contains("the other layout, RSA_AES_KEY_WRAP_SHA_1"), "{msg}");
    assert_eq!(token_objects_labelled("i-length"), 0);
}

#[test]
fn import_under_an_existing_label_is_refused() {
    let imp = importer();
    let transport = imp.transport_key("i-existing").unwrap();
    let first = random(KEK_LEN);
    let algorithm = WrappingAlgorithm::RsaesOaepSha1;
    imp.import_root_key("i-existing", algorithm, &wrap_with_openssl(&transport.pem, algorithm, &first, 0))
        .unwrap();
    let second = random(KEK_LEN);
    let wrapped = wrap_with_openssl(&transport.pem, algorithm, &second, 0);
    let msg = config_error(imp.import_root_key("i-existing", algorithm, &wrapped).unwrap_err());
    assert!(msg.contains("already has an object labelled \"i-existing\""), "{msg}");
    assert_eq!(token_objects_labelled("i-existing"), 1);
    assert_serves_with("i-existing", &first);

    // A root key that kekd generated is not replaced either.
    let mut cfg = config("i-generated");
    cfg.create_root_key = true;
    drop(Pkcs11RootKey::open("test", &cfg, pin(), &shared().lock_dir(), None).unwrap());
    let transport = imp.transport_key("i-generated").unwrap();
    let wrapped = wrap_with_openssl(&transport.pem, algorithm, &second, 0);
    let msg = config_error(imp.import_root_key("i-generated", algorithm, &wrapped).unwrap_err());
    assert!(msg.contains("already has an object labelled \"i-generated\""), "{msg}");
    assert_eq!(token_objects_labelled("i-generated"), 1);
}

#[test]
fn import_without_transport_key_is_refused() {
    let imp = importer();
    let donor = imp.transport_key("i-no-transport-donor").unwrap();
    let algorithm = WrappingAlgorithm::RsaesOaepSha1;
    let wrapped = wrap_with_openssl(&donor.pem, algorithm, &random(KEK_LEN), 0);
    let msg = config_error(imp.import_root_key("i-no-transport", algorithm, &wrapped).unwrap_err());
    assert!(msg.starts_with("no transport key \"i-no-transport-transport\" on token \"kekd-dev\""), "{msg}");
    assert_eq!(token_objects_labelled("i-no-transport"), 0);
    assert_eq!(token_objects_labelled("i-no-transport-transport"), 0, "nor was one made");
}

/// SoftHSM 2.6.1 does not record CKA_VALUE_LEN of an unwrapped key: the length is then
/// measured on the token (plain layout) and known to 8 bytes.
#[test]
fn import_of_material_that_is_not_an_aes_256_key_is_refused() {
    let imp = importer();
    let transport = imp.transport_key("i-size").unwrap();
    let algorithm = WrappingAlgorithm::RsaesOaepSha1;
    for len in [1, 16, 24, 31, 33, 48] {
        let wrapped = wrap_with_openssl(&transport.pem, algorithm, &random(len), 0);
        let msg = config_error(imp.import_root_key("i-size", algorithm, &wrapped).unwrap_err());
        let told = msg.contains(&format!("holds a {len}-byte key"))
            || msg.contains(&format!(" to {} bytes;", len.div_ceil(8) * 8))
            || (len == 31 && msg.contains("does not make a working AES key"));
        assert!(told && msg.contains("nothing was imported"), "{len} bytes: {msg}");
        assert_eq!(token_objects_labelled("i-size"), 0, "{len} bytes");
    }
    assert_eq!(session_secret_keys(), 0, "the measuring keys are gone");

    // An RSA part that holds no AES key: refused before or at its KWP step.
    let algorithm = WrappingAlgorithm::RsaAesKeyWrapSha1;
    let mut wrapped = wrap_with_openssl(&transport.pem, WrappingAlgorithm::RsaesOaepSha1, &random(20), 0);
    wrapped.extend(random(KWP_LEN));
    let msg = config_error(imp.import_root_key("i-size", algorithm, &wrapped).unwrap_err());
    assert!(
        msg.contains("holds 20 bytes, not an AES key")
            || msg.starts_with("the RSA_AES_KEY_WRAP_SHA_1 key material does not unwrap: its AES key wrap"),
        "{msg}"
    );
    assert_eq!(token_objects_labelled("i-size"), 0);
    assert_eq!(session_secret_keys(), 0);

    // A 31-byte key in the RSA-AES layout has the length of a 32-byte one (KWP pads to 32):
    // the token takes it, and it fails as an AES key.
    let mut wrapped = wrap_with_openssl(&transport.pem, WrappingAlgorithm::RsaesOaepSha1, &[7; 32], 0);
    wrapped.extend(openssl(
        &["enc", "-id-aes256-wrap-pad", "-K", &hex::encode([7; 32]), "-iv", "A65959A6"],
        &random(31),
    ));
    let msg = config_error(imp.import_root_key("i-size", algorithm, &wrapped).unwrap_err());
    assert!(msg.contains("does not make a working AES key") || msg.contains("holds a 31-byte key"), "{msg}");
    assert_eq!(token_objects_labelled("i-size"), 0);
}

#[test]
fn import_found_transport_key_that_could_leave_the_token_is_refused() {
    let label = "i-weak-transport";
    with_admin(|s| {
        let mut private = transport_private_template(label);
        for attr in &mut private {
            if let Attribute::Extractable(b) = attr {
                *b = true;
            }
        }
        s.generate_key_pair(&Mechanism::RsaPkcsKeyPairGen, &transport_public_template(label), &private)
            .unwrap();
    });
    let err = importer().transport_key("i-weak").unwrap_err();
    let msg = config_error(err);
    assert!(msg.contains("\"i-weak-transport\"") && msg.contains("could leave the token"), "{msg}");
}

#[test]
fn import_spki_der_matches_openssl() {
    let dir = tempfile::tempdir().unwrap();
    let private = dir.path().join("key.pem");
    for (bits, exponent) in [(1024, 3u32), (3072, 65537)] {
        let (bits_opt, exp_opt) =
            (format!("rsa_keygen_bits:{bits}"), format!("rsa_keygen_pubexp:{exponent}"));
        let private = private.to_str().unwrap();
        let args =
            ["genpkey", "-algorithm", "RSA", "-pkeyopt", &bits_opt, "-pkeyopt", &exp_opt, "-out", private];
        openssl(&args, b"");
        let expected = String::from_utf8(openssl(&["pkey", "-in", private, "-pubout"], b"")).unwrap();
        let modulus =
            String::from_utf8(openssl(&["rsa", "-in", private, "-noout", "-modulus"], b"")).unwrap();
        let modulus = hex::decode(modulus.trim().strip_prefix("Modulus=").unwrap()).unwrap();
        // Leading zero bytes, as a token may return them, change nothing.
        let padded = [&[0, 0][..], &modulus].concat();
        let exponent = exponent.to_be_bytes();
        assert_eq!(pem("PUBLIC KEY", &spki_der(&modulus, &exponent)), expected);
        assert_eq!(pem("PUBLIC KEY", &spki_der(&padded, &exponent)), expected);
    }
}

#[test]
fn import_der_lengths_and_integers_are_minimal() {
    assert_eq!(der_uint(&[]), [0x02, 0x01, 0x00]);
    assert_eq!(der_uint(&[0, 0]), [0x02, 0x01, 0x00]);
    assert_eq!(der_uint(&[0x7f]), [0x02, 0x01, 0x7f]);
    assert_eq!(der_uint(&[0, 0x80]), [0x02, 0x02, 0x00, 0x80]);
    assert_eq!(der_uint(&[1, 0, 1]), [0x02, 0x03, 0x01, 0x00, 0x01]);
    assert_eq!(der(0x04, &[0; 127])[..2], [0x04, 0x7f]);
    assert_eq!(der(0x04, &[0; 128])[..3], [0x04, 0x81, 0x80]);
    assert_eq!(der(0x04, &[0; 300])[..4], [0x04, 0x82, 0x01, 0x2c]);
    assert_eq!(der(0x04, &[0; 300]).len(), 304);
}

#[test]
fn import_algorithm_names_parse() {
    for a in WrappingAlgorithm::ALL {
        assert_eq!(a.name().parse::<WrappingAlgorithm>().unwrap(), a);
        assert_eq!(a.to_string(), a.name());
    }
    assert_eq!(
        "rsa-aes-key-wrap-sha-256".parse::<WrappingAlgorithm>().unwrap(),
        WrappingAlgorithm::RsaAesKeyWrapSha256
    );
    let err = "RSAES_PKCS1_V1_5".parse::<WrappingAlgorithm>().unwrap_err();
    assert!(
        err.to_string().contains("\"RSAES_PKCS1_V1_5\"") && err.to_string().contains("RSAES_OAEP_SHA_256")
    );
    assert_eq!(WrappingAlgorithm::RsaesOaepSha256.wrapped_len(384), 384);
    assert_eq!(WrappingAlgorithm::RsaAesKeyWrapSha1.wrapped_len(384), 424);
}
