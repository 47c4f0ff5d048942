//! A certificate authority made by the test: its CA certificate, and a
//! server certificate it signed for 127.0.0.1 and localhost, as PEM files
//! that confab's `http.tls-*` options take.

use std::path::{Path, PathBuf};

pub struct TestCa {
    pub ca_file: PathBuf,
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
    pub ca_pem: Vec<u8>,
}

impl TestCa {
    /// A fresh CA and server certificate (EC P-256, valid for a day) in `dir`.
    pub fn generate(dir: &Path) -> TestCa {
        Self::try_generate(dir).expect("making the test CA")
    }

    fn try_generate(dir: &Path) -> Result<TestCa, openssl::error::ErrorStack> {
        use openssl::asn1::Asn1Time;
        use openssl::bn::BigNum;
        use openssl::ec::{EcGroup, EcKey};
        use openssl::hash::MessageDigest;
        use openssl::nid::Nid;
        use openssl::pkey::{PKey, Private};
        use openssl::x509::extension::{
            BasicConstraints, ExtendedKeyUsage, KeyUsage, SubjectAlternativeName,
        };
        use openssl::x509::{X509Builder, X509Name, X509NameBuilder, X509};

        let group = EcGroup::from_curve_name(Nid::X9_62_PRIME256V1)?;
        let new_key = || -> Result<PKey<Private>, openssl::error::ErrorStack> {
            PKey::from_ec_key(EcKey::generate(&group)?)
        };
        let name = |cn: &str| -> Result<X509Name, openssl::error::ErrorStack> {
            let mut n = X509NameBuilder::new()?;
            n.append_entry_by_text("CN", cn)?;
            Ok(n.build())
        };
        let builder = |subject: &X509Name,
                       issuer: &X509Name,
                       key: &PKey<Private>|
         -> Result<X509Builder, openssl::error::ErrorStack> {
            let mut b = X509Builder::new()?;
            b.set_version(2)?;
            let serial =
                BigNum::from_slice(&uuid::Uuid::new_v4().as_bytes()[..8])?.to_asn1_integer()?;
            b.set_serial_number(&serial)?;
            b.set_subject_name(subject)?;
            b.set_issuer_name(issuer)?;
            b.set_pubkey(key)?;
            b.set_not_before(Asn1Time::days_from_now(0)?.as_ref())?;
            b.set_not_after(Asn1Time::days_from_now(1)?.as_ref())?;
            Ok(b)
        };

        let ca_key = new_key()?;
        let ca_name = name("confab test CA")?;
        let mut ca = builder(&ca_name, &ca_name, &ca_key)?;
        ca.append_extension(BasicConstraints::new().critical().ca().build()?)?;
        ca.append_extension(
            KeyUsage::new()
                .critical()
                .key_cert_sign()
                .crl_sign()
                .build()?,
        )?;
        ca.sign(&ca_key, MessageDigest::sha256())?;
        let ca: X509 = ca.build();

        let key = new_key()?;
        let mut cert = builder(&name("127.0.0.1")?, &ca_name, &key)?;
        cert.append_extension(BasicConstraints::new().build()?)?;
        cert.append_extension(ExtendedKeyUsage::new().server_auth().build()?)?;
        let san = SubjectAlternativeName::new()
            .ip("127.0.0.1")
            .dns("localhost")
            .build(&cert.x509v3_context(Some(&ca), None))?;
        cert.append_extension(san)?;
        cert.sign(&ca_key, MessageDigest::sha256())?;
        let cert = cert.build();

        let ca_pem = ca.to_pem()?;
        let files = TestCa {
            ca_file: dir.join("ca.pem"),
            cert_file: dir.join("cert.pem"),
            key_file: dir.join("key.pem"),
            ca_pem: ca_pem.clone(),
        };
        let write = |path: &Path, bytes: &[u8]| std::fs::write(path, bytes).expect("writing PEM");
        write(&files.ca_file, &ca_pem);
        write(&files.cert_file, &cert.to_pem()?);
        write(&files.key_file, &key.private_key_to_pem_pkcs8()?);
        Ok(files)
    }

    /// `--set` arguments that make every component serve TLS with this
    /// certificate and trust this CA.
    pub fn sets(&self) -> Vec<String> {
        [
            ("tls-cert-file", &self.cert_file),
            ("tls-key-file", &self.key_file),
            ("tls-ca-file", &self.ca_file),
        ]
        .iter()
        .flat_map(|(k, v)| ["--set".to_owned(), format!("http.{k}={}", v.display())])
        .collect()
    }

    /// A WebSocket connector trusting this CA.
    pub fn ws_connector(&self) -> tokio_tungstenite::Connector {
        tokio_tungstenite::Connector::Rustls(
            confab::tls::client_config(Some(&self.ca_file)).expect("client config"),
        )
    }
}
