//! (c) A DEK sealed in a TPM, the way a naive TPM integration would keep it: a sealed data
//! object under an ECC P-256 storage primary (kekd's template, DESIGN §1), and per DEK
//! `TPM2_Load` + `TPM2_Unseal` + `TPM2_FlushContext`. The primary stays loaded for the
//! whole run (kekd reloads its saved context per operation; a naive integration need
//! not), no parameter encryption (kekd's default over a swtpm TCTI), one thread: a TPM
//! runs one command at a time.

use std::str::FromStr;

use tss_esapi::attributes::ObjectAttributesBuilder;
use tss_esapi::interface_types::algorithm::{HashingAlgorithm, PublicAlgorithm};
use tss_esapi::interface_types::ecc::EccCurve;
use tss_esapi::interface_types::resource_handles::Hierarchy;
use tss_esapi::interface_types::session_handles::AuthSession;
use tss_esapi::structures::{
    Digest, EccPoint, KeyedHashScheme, Private, Public, PublicBuilder, PublicEccParametersBuilder,
    PublicKeyedHashParameters, SensitiveData, SymmetricDefinitionObject,
};
use tss_esapi::{Context, TctiNameConf};

use crate::edek::DEK_LEN;
use crate::measure::{run_threads, Clocking, Report};
use crate::{fail, Context as _, Timing};

struct Tpm {
    ctx: Context,
    primary: tss_esapi::handles::KeyHandle,
    public: Public,
    private: Private,
    dek: Vec<u8>,
}

pub fn run(tcti: &str, timing: Timing) -> crate::Result<Report> {
    // ESYS warns on stderr about every flushed handle it no longer tracks (DESIGN §8).
    if std::env::var_os("TSS2_LOG").is_none() {
        std::env::set_var("TSS2_LOG", "all+none");
    }
    let tcti = tcti.to_owned();
    let report = run_threads("tpm", 1, timing, Clocking::PerOp, |_| open(&tcti), unseal_once)?;
    Ok(report.with("tcti", &tcti))
}

fn open(tcti: &str) -> crate::Result<Tpm> {
    let conf = TctiNameConf::from_str(tcti).context(|| format!("TCTI {tcti:?}"))?;
    let mut ctx = Context::new(conf).context(|| format!("open the TPM at {tcti:?}"))?;
    let primary = ctx
        .execute_with_session(Some(AuthSession::Password), |ctx| {
            ctx.create_primary(Hierarchy::Owner, primary_template()?, None, None, None, None)
        })
        .context(|| "create the storage primary".into())?
        .key_handle;
    let mut dek = vec![0u8; DEK_LEN];
    aws_lc_rs::rand::fill(&mut dek).context(|| "random bytes".into())?;
    let sensitive = SensitiveData::try_from(dek.clone()).context(|| "sensitive data".into())?;
    let created = ctx
        .execute_with_session(Some(AuthSession::Password), |ctx| {
            ctx.create(primary, sealed_object_template()?, None, Some(sensitive), None, None)
        })
        .context(|| "create the sealed object".into())?;
    Ok(Tpm { ctx, primary, public: created.out_public, private: created.out_private, dek })
}

fn unseal_once(t: &mut Tpm) -> crate::Result<()> {
    let (primary, private, public) = (t.primary, t.private.clone(), t.public.clone());
    let object = t
        .ctx
        .execute_with_session(Some(AuthSession::Password), |ctx| ctx.load(primary, private, public))
        .context(|| "TPM2_Load".into())?;
    let unsealed = t.ctx.execute_with_session(Some(AuthSession::Password), |ctx| ctx.unseal(object.into()));
    t.ctx.flush_context(object.into()).context(|| "TPM2_FlushContext".into())?;
    let data = unsealed.context(|| "TPM2_Unseal".into())?;
    if data.value() != t.dek.as_slice() {
        fail!("TPM2_Unseal returned other bytes");
    }
    Ok(())
}

/// `tpm2_createprimary -C o -g sha256 -G ecc256:aes128cfb`, as kekd's backend makes it.
fn primary_template() -> Result<Public, tss_esapi::Error> {
    let attributes = ObjectAttributesBuilder::new()
        .with_fixed_tpm(true)
        .with_fixed_parent(true)
        .with_sensitive_data_origin(true)
        .with_user_with_auth(true)
        .with_restricted(true)
        .with_decrypt(true)
        .build()?;
    PublicBuilder::new()
        .with_public_algorithm(PublicAlgorithm::Ecc)
        .with_name_hashing_algorithm(HashingAlgorithm::Sha256)
        .with_object_attributes(attributes)
        .with_ecc_parameters(
            PublicEccParametersBuilder::new_restricted_decryption_key(
                SymmetricDefinitionObject::AES_128_CFB,
                EccCurve::NistP256,
            )
            .build()?,
        )
        .with_ecc_unique_identifier(EccPoint::default())
        .build()
}

/// A sealed data object without a policy, as kekd seals a KEK when no PCRs are configured.
fn sealed_object_template() -> Result<Public, tss_esapi::Error> {
    let attributes = ObjectAttributesBuilder::new()
        .with_fixed_tpm(true)
        .with_fixed_parent(true)
        .with_no_da(true)
        .with_user_with_auth(true)
        .build()?;
    PublicBuilder::new()
        .with_public_algorithm(PublicAlgorithm::KeyedHash)
        .with_name_hashing_algorithm(HashingAlgorithm::Sha256)
        .with_object_attributes(attributes)
        .with_auth_policy(Digest::default())
        .with_keyed_hash_parameters(PublicKeyedHashParameters::new(KeyedHashScheme::Null))
        .with_keyed_hash_unique_identifier(Digest::default())
        .build()
}

impl Drop for Tpm {
    fn drop(&mut self) {
        // swtpm holds three transient objects: leave none behind.
        let _ = self.ctx.flush_context(self.primary.into());
    }
}
