//! The auditor console in a real browser: Debian's chromium, headless, driven over
//! WebDriver by chromedriver, against three federated regions. The auditor searches,
//! opens a record and sees it verified, follows up an emergency access, makes a patient
//! report across the regions, watches the log's state, and sees a record changed in a
//! region's store reported as not verified. A request without the printed address's
//! secret is refused.
//!
//! With `PIL_CONSOLE_SCREENSHOTS=<dir>` the test saves a screenshot of each view there
//! (docs/images/console holds the ones in the auditor guide).

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::Duration,
};

use fantoccini::{Client, ClientBuilder, Locator};
use pil_client::console::{self, ConsoleConfig, RegionSetup};
use pil_client::{Profile, v1};
use pil_tests::*;

const REGIONS: [&str; 3] = ["vest", "midt", "nord"];
const NAME: &str = "Kari Nordmann";
const ORG_NAME: &str = "Bergen legesenter";

/// chromedriver on a free loopback port, stopped when dropped.
struct Driver {
    child: Child,
    port: u16,
}

impl Driver {
    async fn start() -> Self {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let child = Command::new("chromedriver")
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("chromedriver (Debian's chromium-driver; .ci/setup installs it)");
        // Dropped, and so stopped, if it never listens.
        let driver = Self { child, port };
        for _ in 0..100 {
            if tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .is_ok()
            {
                return driver;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("chromedriver did not start listening");
    }

    async fn browser(&self) -> Client {
        let mut caps = serde_json::Map::new();
        caps.insert(
            "goog:chromeOptions".into(),
            serde_json::json!({
                "binary": "/usr/bin/chromium",
                "args": ["--headless=new", "--no-sandbox", "--disable-gpu",
                         "--disable-dev-shm-usage", "--window-size=1280,1100",
                         "--no-first-run", "--disable-extensions"],
            }),
        );
        ClientBuilder::new(hyper_util::client::legacy::connect::HttpConnector::new())
            .capabilities(caps)
            .connect(&format!("http://127.0.0.1:{}", self.port))
            .await
            .expect("a chromium session")
    }
}

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Saves a screenshot of the page when screenshots are asked for.
async fn screenshot(browser: &Client, name: &str) {
    let Some(dir) = std::env::var_os("PIL_CONSOLE_SCREENSHOTS") else {
        return;
    };
    let dir = PathBuf::from(dir);
    std::fs::create_dir_all(&dir).unwrap();
    let png = browser.screenshot().await.expect("screenshot");
    std::fs::write(dir.join(format!("{name}.png")), png).unwrap();
}

/// After a form is submitted: waits (bounded) until the page's URL holds `part`, since a
/// click may return before the browser has loaded the answer.
async fn wait_for_url(browser: &Client, part: &str) {
    for _ in 0..300 {
        if browser
            .current_url()
            .await
            .is_ok_and(|u| u.as_str().contains(part))
        {
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    panic!("the browser never reached a page whose URL holds {part:?}");
}

/// The text of `css` once it holds `needle`, or as it is after a bounded wait: the
/// page a form answers with may not be loaded when the click returns.
async fn text_once_it_holds(browser: &Client, css: &str, needle: &str) -> String {
    for _ in 0..300 {
        if let Ok(e) = browser.find(Locator::Css(css)).await
            && let Ok(t) = e.text().await
            && t.contains(needle)
        {
            return t;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    text(browser, css).await
}

async fn text(browser: &Client, css: &str) -> String {
    browser
        .find(Locator::Css(css))
        .await
        .unwrap_or_else(|e| panic!("no {css} on the page: {e}"))
        .text()
        .await
        .unwrap()
}

async fn body(browser: &Client) -> String {
    text(browser, "body").await
}

/// `method path` over HTTP/1.1 with `headers`: the status line.
async fn http(addr: SocketAddr, method: &str, path: &str, headers: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let body = if method == "POST" {
        "index=0&note=x"
    } else {
        ""
    };
    tcp.write_all(
        format!(
            "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n{headers}\
             Content-Type: application/x-www-form-urlencoded\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        )
        .as_bytes(),
    )
    .await
    .unwrap();
    let mut text = String::new();
    tcp.read_to_string(&mut text).await.unwrap();
    text.lines().next().unwrap_or("").to_string()
}

fn setup(world: &World, region: &str, addr: SocketAddr) -> RegionSetup {
    RegionSetup {
        profile: Profile::load(&world.profile(HOST, addr)).unwrap(),
        public_key: world
            .path()
            .join("regions")
            .join(region)
            .join("audit")
            .join("public-key.pem"),
    }
}

/// The nodes of the three regions, each with its configuration (to restart it).
struct Nodes {
    nodes: Vec<(String, pil_node::config::NodeConfig, TestNode)>,
}

impl Nodes {
    async fn start(world: &World) -> Self {
        let mut nodes = Vec::new();
        for region in REGIONS {
            let config = world.region_config(region);
            let node = TestNode::start(config.clone()).await;
            nodes.push((region.to_string(), config, node));
        }
        let nodes = Self { nodes };
        nodes.federate();
        nodes
    }

    fn federate(&self) {
        let pairs: Vec<(&str, &TestNode)> =
            self.nodes.iter().map(|(r, _, n)| (r.as_str(), n)).collect();
        federate(&pairs);
    }

    fn config(&self, region: &str) -> pil_node::config::NodeConfig {
        self.nodes
            .iter()
            .find(|(r, ..)| r == region)
            .unwrap()
            .1
            .clone()
    }

    fn addr(&self, region: &str) -> SocketAddr {
        self.nodes
            .iter()
            .find(|(r, ..)| r == region)
            .unwrap()
            .2
            .addr()
    }

    /// Stops `region`'s node, runs `change` on its stopped store, and starts it again
    /// on the same address.
    async fn restart_after(&mut self, region: &str, change: impl FnOnce(&Path)) {
        let i = self.nodes.iter().position(|(r, ..)| r == region).unwrap();
        let (name, mut config, node) = self.nodes.remove(i);
        let addr = node.addr();
        node.stop().await;
        change(&config.data_dir);
        config.listen = addr;
        let node = TestNode::start(config.clone()).await;
        self.nodes.insert(i, (name, config, node));
        self.federate();
    }

    async fn stop(self) {
        for (_, _, node) in self.nodes {
            node.stop().await;
        }
    }
}

/// Changes the HPR number in record `index` of a stopped node's log: someone covers
/// their tracks.
async fn tamper(nodes: &mut Nodes, region: &str, index: u64) {
    let from = format!("\"hpr_number\":\"{HPR}\"");
    let to = "\"hpr_number\":\"9144900\"";
    if on_postgres() {
        let url = nodes
            .config(region)
            .storage
            .postgres
            .expect("on PostgreSQL")
            .url;
        let (client, connection) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
            .await
            .unwrap();
        tokio::spawn(connection);
        let sql = format!(
            "UPDATE audit_records SET record = convert_to(replace(convert_from(record, 'UTF8'), \
             '{from}', '{to}'), 'UTF8') WHERE idx = {index}"
        );
        assert_eq!(client.execute(&sql, &[]).await.unwrap(), 1);
        return;
    }
    nodes
        .restart_after(region, |data_dir| {
            let opts = rocksdb::Options::default();
            let cfs = rocksdb::DB::list_cf(&opts, data_dir).unwrap();
            let db = rocksdb::DB::open_cf(&opts, data_dir, &cfs).unwrap();
            let cf = db.cf_handle("audit_records").unwrap();
            let key = index.to_be_bytes();
            let old = String::from_utf8(db.get_cf(cf, key).unwrap().expect("record")).unwrap();
            assert!(old.contains(&from), "{old}");
            db.put_cf(cf, key, old.replace(&from, to).as_bytes())
                .unwrap();
            db.flush_cf(cf).unwrap();
        })
        .await;
}

async fn wait_for_head(client: &pil_client::PilClient) {
    client.audit_tree_head(true).await.expect("sign a head");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_auditor_reviews_the_log_in_a_browser_and_sees_tampering() {
    let world = World::new();
    let mut nodes = Nodes::start(&world).await;
    let (vest, nord) = (nodes.addr("vest"), nodes.addr("nord"));
    let patient = patient_id(4711);

    // Data about the patient in two regions; a doctor in vest, named in the attest.
    for (region, n) in [("vest", 1), ("nord", 2)] {
        world
            .client(ORG_A, nodes.addr(region))
            .await
            .upsert(pointer(&patient, ORG_A, n, &["medications"]))
            .await
            .unwrap();
    }
    let named = |p: &mut pil_client::DevTokenParams| {
        p.organization_name = Some(ORG_NAME.into());
        p.practitioner = Some(("13116900216".into(), NAME.into()));
    };
    let doctor = world.client_as(ORG_A, vest, named).await;
    doctor.lookup(lookup(&patient)).await.unwrap();
    let emergency = world
        .client_as(ORG_A, vest, |p| {
            named(p);
            p.purpose = "ETREAT".into();
            p.care_relationship = false;
        })
        .await;
    assert!(emergency.lookup(lookup(&patient)).await.unwrap().emergency);
    let researcher = world
        .client_as(ORG_A, vest, |p| p.purpose = "HRESCH".into())
        .await;
    for _ in 0..3 {
        researcher.lookup(lookup(&patient)).await.unwrap_err();
    }
    // An organization that holds nothing for the patient looks them up.
    let other = world.client(ORG_C, vest).await;
    other.lookup(lookup(&patient)).await.unwrap();
    for region in REGIONS {
        wait_for_head(&world.client(HOST, nodes.addr(region)).await).await;
    }

    let state = tempfile::tempdir().unwrap();
    let running = console::start(ConsoleConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        regions: REGIONS
            .iter()
            .map(|r| setup(&world, r, nodes.addr(r)))
            .collect(),
        state_dir: state.path().to_path_buf(),
    })
    .await
    .expect("the console starts");
    let addr = running.addr();

    // Without the printed address's secret, nothing is served.
    assert!(http(addr, "GET", "/", "").await.contains("403"));
    assert!(http(addr, "GET", "/login/0123", "").await.contains("403"));

    let driver = Driver::start().await;
    let browser = driver.browser().await;
    browser.goto(running.login_url()).await.unwrap();
    // The secret works once: the same address again is refused, in any client.
    let used = url_path(running.login_url());
    assert!(http(addr, "GET", &used, "").await.contains("403"));

    // Overview: the pictures.
    assert_eq!(browser.current_url().await.unwrap().path(), "/");
    let overview = body(&browser).await;
    assert!(overview.contains("Overview of vest"), "{overview}");
    assert!(overview.contains("6 lookups"), "{overview}");
    assert!(overview.contains("3 refused"), "{overview}");
    assert!(overview.contains("1 awaiting review"), "{overview}");
    assert_eq!(
        browser
            .find_all(Locator::Css("svg.chart"))
            .await
            .unwrap()
            .len(),
        3
    );
    screenshot(&browser, "overview").await;

    // Search by patient: the three lookups, newest first.
    browser
        .goto(&format!("http://{addr}/search"))
        .await
        .unwrap();
    let form = browser.form(Locator::Css("form.grid")).await.unwrap();
    form.set_by_name("patient", &patient.value).await.unwrap();
    form.set_by_name("action", "lookups").await.unwrap();
    form.submit().await.unwrap();
    wait_for_url(&browser, "patient=").await;
    let rows = browser.find_all(Locator::Css("tbody tr")).await.unwrap();
    assert_eq!(rows.len(), 6);
    let table = text(&browser, "table").await;
    assert!(table.contains(&format!("{NAME} (HPR {HPR})")), "{table}");
    assert!(table.contains(&format!("{ORG_NAME} ({ORG_A})")), "{table}");
    assert!(table.contains("emergency"), "{table}");
    screenshot(&browser, "search").await;

    // A record: verified against a signed head, with its rules and legal basis.
    browser
        .find(Locator::Css("tbody tr:last-child a"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    let proof = text(&browser, "#proof").await;
    assert!(proof.starts_with("Verified."), "{proof}");
    let rules = text(&browser, "main table").await;
    assert!(rules.contains("§"), "a legal basis: {rules}");
    screenshot(&browser, "record").await;

    // Follow-up: the emergency access awaits review; marking it reviewed is recorded.
    browser
        .goto(&format!("http://{addr}/follow-up"))
        .await
        .unwrap();
    let follow = body(&browser).await;
    assert!(follow.contains("1 awaiting, 0 reviewed"), "{follow}");
    let flags = text(&browser, "#flags").await;
    assert!(
        flags.contains(&format!("Repeated refusals HPR {HPR} 3 lookups refused")),
        "{flags}"
    );
    assert!(
        flags.contains(&format!(
            "Patients the organization holds nothing for {ORG_C} 1 patients"
        )),
        "{flags}"
    );
    screenshot(&browser, "follow-up").await;
    browser
        .find(Locator::Css("#h-emergency ~ .scroll tbody a"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    assert!(text(&browser, "main dl").await.contains("emergency access"));
    let review = browser.form(Locator::Css("form.review")).await.unwrap();
    review
        .set_by_name("note", "Akutt innleggelse, bekreftet av vakthavende")
        .await
        .unwrap();
    review
        .set_by_name("reviewer", "Personvernombud Ola")
        .await
        .unwrap();
    review.submit().await.unwrap();
    let reviews = text_once_it_holds(
        &browser,
        "#reviews",
        "Personvernombud Ola: Akutt innleggelse",
    )
    .await;
    assert!(
        reviews.contains("Personvernombud Ola: Akutt innleggelse"),
        "{reviews}"
    );
    browser
        .goto(&format!("http://{addr}/follow-up"))
        .await
        .unwrap();
    assert!(body(&browser).await.contains("0 awaiting, 1 reviewed"));
    // The review is a record of vest's log.
    let host = world.client(HOST, vest).await;
    let found = host
        .audit_search(v1::SearchAuditRequest {
            filter: Some(v1::AuditFilter {
                actions: vec!["audit_review".into()],
                ..Default::default()
            }),
            page_size: 10,
            page_token: String::new(),
        })
        .await
        .unwrap();
    assert_eq!(found.records.len(), 1);

    // A change without the form's CSRF token is refused.
    let cookie = browser
        .get_named_cookie("pil_console")
        .await
        .expect("the session cookie");
    let with_cookie = format!("Cookie: pil_console={}\r\n", cookie.value());
    assert!(
        http(addr, "POST", "/review", &with_cookie)
            .await
            .contains("403")
    );

    // The patient report across the three regions, in bokmål, every row proven.
    browser
        .goto(&format!("http://{addr}/report?patient={}", patient.value))
        .await
        .unwrap();
    let report = text(&browser, "#report").await;
    assert!(report.contains(NAME), "{report}");
    assert!(report.contains("Akutt behandling (nødrett)"), "{report}");
    for region in REGIONS {
        assert!(
            report.contains(&format!("{region}: bekreftet")),
            "{region} in {report}"
        );
    }
    assert_eq!(
        text(&browser, "#proven").await,
        "Alle oppføringene er bekreftet."
    );
    screenshot(&browser, "report").await;
    browser
        .find(Locator::LinkText("In English"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    assert!(text(&browser, "h1").await.contains("Who has looked me up?"));

    // Log state: first seen, then consistent.
    browser.goto(&format!("http://{addr}/log")).await.unwrap();
    assert!(
        text(&browser, "#consistency-nord")
            .await
            .starts_with("First look")
    );
    browser.refresh().await.unwrap();
    assert!(
        text(&browser, "#consistency-nord")
            .await
            .starts_with("Consistent")
    );
    screenshot(&browser, "log").await;

    // Someone changes nord's record of the federated lookup in its store.
    let nord_host = world.client(HOST, nord).await;
    let forwarded = nord_host
        .audit_search(v1::SearchAuditRequest {
            filter: Some(v1::AuditFilter {
                actions: vec!["federated_lookup".into()],
                hpr_number: HPR.into(),
                purpose_of_use: "TREAT".into(),
                ..Default::default()
            }),
            page_size: 10,
            page_token: String::new(),
        })
        .await
        .unwrap();
    let index =
        serde_json::from_slice::<serde_json::Value>(&forwarded.records[0]).unwrap()["index"]
            .as_u64()
            .unwrap();
    drop(nord_host);
    tamper(&mut nodes, "nord", index).await;
    browser
        .goto(&format!("http://{addr}/record?region=nord&index={index}"))
        .await
        .unwrap();
    let proof = text(&browser, "#proof").await;
    assert!(proof.starts_with("Not verified."), "{proof}");
    assert!(
        proof.contains(&format!("record {index} does not match")),
        "{proof}"
    );
    screenshot(&browser, "record-tampered").await;
    browser
        .goto(&format!("http://{addr}/report?patient={}", patient.value))
        .await
        .unwrap();
    assert!(
        text(&browser, "#report")
            .await
            .contains("nord: IKKE bekreftet")
    );
    assert_eq!(
        text(&browser, "#proven").await,
        "Ikke alle oppføringene er bekreftet; se kolonnen «Regioner»."
    );

    browser.close().await.unwrap();
    drop(driver);
    running.stop().await.unwrap();
    drop((doctor, emergency, researcher, other, host));
    nodes.stop().await;
}

fn url_path(url: &str) -> String {
    let rest = url.strip_prefix("http://").unwrap();
    rest[rest.find('/').unwrap()..].to_string()
}
