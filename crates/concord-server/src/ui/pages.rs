//! The HTML of the dashboard's pages: the frame each page shares (navigation, the
//! session's CSRF token, the confirmation dialog) and the fixed part of each page
//! (headings, forms with labels, the containers the script fills).
//!
//! Plain string building: everything that comes from outside (ids, token ids,
//! messages) goes through [`escape`]; the rest is constant.

use concord_core::authz::Principal;

/// One page of the dashboard.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Page {
    Fleet,
    Instance,
    Queues,
    Memory,
    Events,
    Breakers,
    Tokens,
}

impl Page {
    /// The name the script dispatches on (`<body data-page>`).
    fn key(self) -> &'static str {
        match self {
            Page::Fleet => "fleet",
            Page::Instance => "instance",
            Page::Queues => "queues",
            Page::Memory => "memory",
            Page::Events => "events",
            Page::Breakers => "breakers",
            Page::Tokens => "tokens",
        }
    }

    fn title(self) -> &'static str {
        match self {
            Page::Fleet => "Fleet",
            Page::Instance => "Instance",
            Page::Queues => "Queues",
            Page::Memory => "Memory",
            Page::Events => "Events",
            Page::Breakers => "Breakers & leases",
            Page::Tokens => "Tokens",
        }
    }

    /// The navigation entry this page is under.
    fn nav(self) -> Page {
        match self {
            Page::Instance => Page::Fleet,
            p => p,
        }
    }
}

/// What the frame of a page needs to know.
pub struct Frame<'a> {
    pub page: Page,
    pub id: Option<&'a str>,
    pub principal: &'a Principal,
    pub csrf: &'a str,
    /// The hub's clock, so countdowns in the browser follow it, not the laptop's.
    pub now_ms: i64,
}

/// HTML-escapes text for element content and quoted attribute values.
pub fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

fn head(title: &str, extra_meta: &str) -> String {
    format!(
        "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\
         <title>{} · Concord</title>\
         <link rel=\"icon\" href=\"/ui/assets/icon.svg\" type=\"image/svg+xml\">\
         <link rel=\"stylesheet\" href=\"/ui/assets/app.css\">{extra_meta}</head>",
        escape(title)
    )
}

const NAV: &[Page] = &[
    Page::Fleet,
    Page::Queues,
    Page::Memory,
    Page::Events,
    Page::Breakers,
    Page::Tokens,
];

fn href(p: Page) -> &'static str {
    match p {
        Page::Fleet | Page::Instance => "/ui",
        Page::Queues => "/ui/queues",
        Page::Memory => "/ui/memory",
        Page::Events => "/ui/events",
        Page::Breakers => "/ui/breakers",
        Page::Tokens => "/ui/tokens",
    }
}

/// A whole page: frame plus the page's own fixed part.
pub fn shell(f: &Frame<'_>) -> String {
    let admin = f.principal.is_admin();
    let meta = format!(
        "<meta name=\"concord-csrf\" content=\"{}\"><meta name=\"concord-role\" content=\"{}\">\
         <meta name=\"concord-now\" content=\"{}\"><script src=\"/ui/assets/app.js\" defer></script>",
        escape(f.csrf),
        f.principal.kind.as_str(),
        f.now_ms
    );
    let mut out = head(f.page.title(), &meta);
    out.push_str(&format!(
        "<body data-page=\"{}\" data-id=\"{}\" class=\"{}\">",
        f.page.key(),
        escape(f.id.unwrap_or("")),
        if admin { "admin" } else { "reader" }
    ));
    out.push_str("<a class=\"skip\" href=\"#main\">Skip to content</a><header class=\"top\">");
    out.push_str("<a class=\"brand\" href=\"/ui\"><img src=\"/ui/assets/icon.svg\" alt=\"\" width=\"18\" height=\"18\"> Concord</a>");
    out.push_str("<nav aria-label=\"Dashboard\"><ul>");
    for p in NAV {
        if *p == Page::Tokens && !admin {
            continue;
        }
        let current = if f.page.nav() == *p {
            " aria-current=\"page\""
        } else {
            ""
        };
        out.push_str(&format!(
            "<li><a href=\"{}\"{current}>{}</a></li>",
            href(*p),
            p.title()
        ));
    }
    out.push_str("</ul></nav><div class=\"session\">");
    out.push_str("<span id=\"live\" class=\"live\" role=\"status\">connecting…</span>");
    out.push_str(&format!(
        "<span class=\"who\" title=\"token {}\">{}</span>",
        escape(&f.principal.token_id),
        if admin {
            "admin"
        } else {
            "reader · read-only"
        }
    ));
    out.push_str(&format!(
        "<form method=\"post\" action=\"/ui/logout\"><input type=\"hidden\" name=\"csrf\" value=\"{}\">\
         <button type=\"submit\" class=\"link\">Log out</button></form></div></header>",
        escape(f.csrf)
    ));
    out.push_str("<main id=\"main\" tabindex=\"-1\">");
    out.push_str(&body(f));
    out.push_str("</main>");
    out.push_str(CONFIRM_DIALOG);
    out.push_str("<div id=\"toast\" class=\"toast\" role=\"alert\" hidden></div></body></html>");
    out
}

/// Every admin action asks here first: what will happen, to what, and Cancel focused.
const CONFIRM_DIALOG: &str = "<dialog id=\"confirm\" aria-labelledby=\"confirm-title\">\
    <form method=\"dialog\"><h2 id=\"confirm-title\">Are you sure?</h2>\
    <p id=\"confirm-text\"></p><div class=\"buttons\">\
    <button value=\"cancel\" id=\"confirm-cancel\" autofocus>Cancel</button>\
    <button value=\"ok\" id=\"confirm-ok\" class=\"danger\">Confirm</button></div></form></dialog>";

fn body(f: &Frame<'_>) -> String {
    match f.page {
        Page::Fleet => "<div class=\"page-head\"><h1>Fleet</h1><p id=\"fleet-summary\" class=\"sub\"></p></div>\
            <section id=\"ghosts\" class=\"ghosts\" aria-label=\"Ghost reports\" hidden></section>\
            <div id=\"entities\" class=\"cards\"><p class=\"muted\">Loading…</p></div>"
            .to_string(),
        Page::Instance => format!(
            "<p class=\"crumbs\"><a href=\"/ui\">Fleet</a> / <span id=\"crumb-entity\"></span></p>\
             <div class=\"page-head\"><h1 id=\"inst-title\">{}</h1><p id=\"inst-sub\" class=\"sub\"></p></div>\
             <div id=\"instance\" class=\"grid2\"><p class=\"muted\">Loading…</p></div>\
             <section><h2>Recent events</h2><ol id=\"inst-events\" class=\"events\"></ol></section>",
            escape(f.id.unwrap_or(""))
        ),
        Page::Queues => "<div class=\"page-head\"><h1>Queues</h1><p id=\"queue-summary\" class=\"sub\"></p></div>\
            <section><h2>Per queue</h2><div id=\"queues\"><p class=\"muted\">Loading…</p></div></section>\
            <div class=\"grid2\"><section><h2>Waiting tasks</h2><div id=\"pending\"></div></section>\
            <section><h2>Dead tasks</h2><div id=\"dead\"></div></section></div>\
            <section><h2>Schedules</h2><div id=\"schedules\"></div></section>"
            .to_string(),
        Page::Memory => "<div class=\"page-head\"><h1>Memory</h1></div>\
            <form id=\"recall\" class=\"bar\" role=\"search\">\
            <label for=\"q\">Recall</label><input id=\"q\" name=\"q\" type=\"search\" required autocomplete=\"off\" placeholder=\"what do we know about…\">\
            <label for=\"space\">Space</label><input id=\"space\" name=\"space\" autocomplete=\"off\" placeholder=\"any (entity:E, shared:N)\">\
            <label class=\"check\"><input type=\"checkbox\" id=\"closed\" name=\"closed\"> include forgotten</label>\
            <button type=\"submit\">Search</button></form>\
            <div id=\"results\" aria-live=\"polite\"></div>\
            <div class=\"grid2\"><section><h2>History of a memory</h2>\
            <form id=\"history-form\" class=\"bar\"><label for=\"mem-id\">Memory id</label>\
            <input id=\"mem-id\" required autocomplete=\"off\" placeholder=\"mem_…\"><button type=\"submit\">Show</button></form>\
            <div id=\"history\"></div></section>\
            <section><h2>Fork diff</h2><form id=\"diff-form\" class=\"bar\"><label for=\"fork-id\">Fork instance</label>\
            <input id=\"fork-id\" required autocomplete=\"off\" placeholder=\"ins_…\"><button type=\"submit\">Diff</button></form>\
            <div id=\"diff\"></div></section></div>\
            <section><h2>Trust lists</h2><div id=\"trust\"></div></section>"
            .to_string(),
        Page::Events => "<div class=\"page-head\"><h1>Events</h1><p class=\"sub\">Live tail, newest first.</p></div>\
            <form id=\"filter\" class=\"bar\"><label for=\"topics\">Topics</label>\
            <input id=\"topics\" autocomplete=\"off\" placeholder=\"everything, or e.g. sys.instance.&gt;, app.*\">\
            <button type=\"submit\">Apply</button>\
            <button type=\"button\" id=\"pause\" aria-pressed=\"false\">Pause</button></form>\
            <p id=\"filter-error\" class=\"error\" hidden></p>\
            <ol id=\"tail\" class=\"events\"></ol>"
            .to_string(),
        Page::Breakers => "<div class=\"page-head\"><h1>Breakers &amp; leases</h1></div>\
            <section><h2>Breakers</h2><div id=\"breakers\"><p class=\"muted\">Loading…</p></div></section>\
            <section><h2>Leases</h2><div id=\"leases\"></div></section>"
            .to_string(),
        Page::Tokens => "<div class=\"page-head\"><h1>Tokens</h1><p class=\"sub\">Secrets are never shown again; revoke what leaked.</p></div>\
            <div id=\"tokens\"><p class=\"muted\">Loading…</p></div>"
            .to_string(),
    }
}

/// The login form; `error` says what was wrong with the last attempt.
pub fn login_page(error: Option<&str>) -> String {
    let mut out = head("Log in", "");
    out.push_str("<body class=\"login\"><main id=\"main\"><form method=\"post\" action=\"/ui/login\" class=\"login-box\">");
    out.push_str(
        "<h1><img src=\"/ui/assets/icon.svg\" alt=\"\" width=\"22\" height=\"22\"> Concord</h1>",
    );
    out.push_str("<p class=\"sub\">Log in with a reader token (read-only) or an admin token.</p>");
    if let Some(e) = error {
        out.push_str(&format!(
            "<p class=\"error\" role=\"alert\" id=\"login-error\">{}</p>",
            escape(e)
        ));
    }
    out.push_str(
        "<label for=\"token\">Token</label>\
         <input id=\"token\" name=\"token\" type=\"password\" required autocomplete=\"off\" autofocus spellcheck=\"false\">\
         <button type=\"submit\">Log in</button></form></main></body></html>",
    );
    out
}

/// A page with a title and one sentence (not found, refused).
pub fn message_page(title: &str, text: &str) -> String {
    let mut out = head(title, "");
    out.push_str(&format!(
        "<body class=\"login\"><main id=\"main\" class=\"login-box\"><h1>{}</h1><p>{}</p>\
         <p><a href=\"/ui\">Back to the dashboard</a></p></main></body></html>",
        escape(title),
        escape(text)
    ));
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use concord_core::token::TokenKind;

    #[test]
    fn escaping_covers_markup_and_quotes() {
        assert_eq!(
            escape("<a href=\"x\">'&'</a>"),
            "&lt;a href=&quot;x&quot;&gt;&#39;&amp;&#39;&lt;/a&gt;"
        );
    }

    #[test]
    fn readers_get_no_tokens_page_in_the_navigation_and_ids_are_escaped() {
        let reader = Principal {
            token_id: "tok_<r>".into(),
            kind: TokenKind::Reader,
            entity: None,
            instance: None,
        };
        let html = shell(&Frame {
            page: Page::Instance,
            id: Some("ins_\"><script>"),
            principal: &reader,
            csrf: "c0ffee",
            now_ms: 1,
        });
        assert!(!html.contains("/ui/tokens"));
        assert!(!html.contains("<script>"));
        assert!(html.contains("tok_&lt;r&gt;"));
        assert!(html.contains("content=\"c0ffee\""));
        assert!(html.contains("reader · read-only"));
        let admin = Principal {
            kind: TokenKind::Admin,
            ..reader
        };
        let html = shell(&Frame {
            page: Page::Fleet,
            id: None,
            principal: &admin,
            csrf: "c",
            now_ms: 1,
        });
        assert!(html.contains("href=\"/ui/tokens\""));
        assert!(html.contains("<a href=\"/ui\" aria-current=\"page\">Fleet</a>"));
    }
}
