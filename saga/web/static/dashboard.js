// saga dashboard: live refresh. Hand-written, no build step, no dependencies.
//
// The page listens to the dashboard's server-sent events (/events). The server tells it
// when something changed in the database (it LISTENs and watches the history; browsers
// never poll the database); the page then fetches its own URL again and swaps the main
// content. While somebody is using a form (a field has focus, a field holds what they
// typed and have not sent, or a button is being pressed), the refresh waits.
(function () {
  "use strict";
  var body = document.body;
  var url = body.getAttribute("data-events");
  var live = document.querySelector("[data-testid=live-status]");
  // Pages answering a form (a confirmation, a refusal) have no URL to fetch again.
  if (!url || !window.EventSource || body.hasAttribute("data-static")) { return; }

  var pending = false;
  var busy = false;
  var pressing = false;
  var FIELDS = "#main form input, #main form textarea, #main form select";

  // A field's value as the page showed it, read once it is in the page: the browser
  // normalizes a value (a time's ":00" seconds dropped, a text field's line breaks), so
  // comparing with the markup's default would take every such field for typed into.
  function remember() {
    var fields = document.querySelectorAll(FIELDS);
    for (var i = 0; i < fields.length; i++) { fields[i].sagaShown = fields[i].value; }
  }

  function edited(el) {
    var type = (el.getAttribute("type") || "").toLowerCase();
    if (type === "hidden" || type === "submit" || type === "button") { return false; }
    if (type === "checkbox" || type === "radio") { return el.checked !== el.defaultChecked; }
    if (el.tagName === "SELECT") {
      for (var i = 0; i < el.options.length; i++) {
        if (el.options[i].selected !== el.options[i].defaultSelected) { return true; }
      }
      return false;
    }
    return el.value !== (el.sagaShown === undefined ? el.defaultValue : el.sagaShown);
  }

  function typing() {
    if (pressing) { return true; }
    var el = document.activeElement;
    if (el) {
      var tag = el.tagName;
      if (tag === "INPUT" || tag === "TEXTAREA" || tag === "SELECT") { return true; }
    }
    // What was typed into a form and not sent would be lost with the page's content.
    var fields = document.querySelectorAll(FIELDS);
    for (var i = 0; i < fields.length; i++) {
      if (edited(fields[i])) { return true; }
    }
    return false;
  }

  function held() {
    if (!live) { return; }
    var waiting = pending && typing();
    live.classList.toggle("held", waiting);
    live.title = waiting ? "updates wait while a form holds what you typed" : "live updates";
  }

  function refresh() {
    if (busy) { pending = true; return; }
    if (typing()) { pending = true; held(); return; }
    pending = false;
    held();
    busy = true;
    fetch(window.location.href, { credentials: "same-origin", headers: { "X-Saga-Refresh": "1" } })
      .then(function (response) {
        if (!response.ok) { throw new Error("HTTP " + response.status); }
        return response.text();
      })
      .then(function (html) {
        var doc = new DOMParser().parseFromString(html, "text/html");
        var fresh = doc.getElementById("main");
        var main = document.getElementById("main");
        if (fresh && main && !typing()) {
          // The flash message shown (the answer to the action that led here) stays while
          // the page does; one in the fetched page is not shown twice.
          var flash = fresh.querySelector("[data-testid=flash]");
          if (flash) { flash.remove(); }
          var shown = main.querySelector("[data-testid=flash]");
          if (shown) { fresh.insertBefore(shown, fresh.firstChild); }
          main.replaceWith(fresh);
          remember();
        } else if (fresh) {
          pending = true;
        }
      })
      .catch(function () { /* the next change tries again */ })
      .then(function () {
        busy = false;
        if (pending && !typing()) { window.setTimeout(refresh, 250); }
      });
  }

  function later() {
    window.setTimeout(function () { if (pending && !typing()) { refresh(); } }, 100);
  }

  // A press (button down, then up) must land on the page it began on. Only the main
  // button's: a right button's up may never come (the context menu takes it), nor one
  // whose window lost focus meanwhile (a blur ends the press).
  document.addEventListener("pointerdown", function (e) {
    if (e.button === 0) { pressing = true; }
  }, true);
  window.addEventListener("blur", function () {
    if (pressing) { pressing = false; later(); }
  });
  document.addEventListener("pointerup", function () {
    window.setTimeout(function () { pressing = false; later(); }, 0);
  }, true);
  document.addEventListener("pointercancel", function () { pressing = false; later(); }, true);
  document.addEventListener("focusout", later);
  document.addEventListener("input", held);
  document.addEventListener("reset", function () { window.setTimeout(later, 0); }, true);

  remember();

  function opened() {
    if (live) { live.classList.add("on"); }
    refresh();
  }

  function lost() {
    if (live) { live.classList.remove("on"); }
  }

  // What time alone changes (lags, work overdue once due for a minute) writes nothing
  // that would announce it: a page showing such figures (data-tick, in seconds) is
  // fetched again that often while it is live.
  window.setInterval(function () {
    var tick = document.querySelector("#main [data-tick]");
    if (!tick || !live || !live.classList.contains("on")) { return; }
    var every = 1000 * Number(tick.getAttribute("data-tick"));
    if (Date.now() - (tick.sagaSince || (tick.sagaSince = Date.now())) >= every) { refresh(); }
  }, 1000);

  // Whatever changed between the page's render and its stream's start (or during a
  // reconnection) was announced to nobody: the page is fetched once the stream is open.
  // A browser reconnects a stream by itself after a network error, but gives up on an
  // HTTP error (a proxy's 502 while the server restarts): then this tries again, from
  // 3 s doubling to 30 s, so the tab (and the tabs it tells) does not stay stale.
  var stream = null;
  function listen(tell) {
    var delay = 3000;
    function connect() {
      var source = stream = new EventSource(url);
      source.addEventListener("open", function () { delay = 3000; tell("open"); opened(); });
      source.addEventListener("error", function () {
        tell("error");
        lost();
        if (source.readyState === 2) {  // closed for good by the browser
          window.setTimeout(connect, delay);
          delay = Math.min(delay * 2, 30000);
        }
      });
      source.addEventListener("change", function () { tell("change"); refresh(); });
    }
    connect();
  }

  // A browser opens at most 6 HTTP/1.1 connections to a host, and a stream holds one for
  // as long as its page is open: with a stream per tab, six open tabs would leave none
  // for the pages themselves. So the tabs of this dashboard share one stream: the tab
  // holding the lock (until it closes) listens and tells the others on a channel; the
  // next one takes over when it closes. Without these APIs (an insecure context: plain
  // http on another host than localhost), each tab has a stream of its own.
  if (!window.BroadcastChannel || !navigator.locks || !navigator.locks.request) {
    listen(function () {});
    return;
  }
  var name = "saga-dashboard " + new URL(url, window.location.href).href;
  var channel = new BroadcastChannel(name);
  channel.onmessage = function (message) {
    var what = message.data;
    if (what === "hello") {  // a tab just opened: is the stream open?
      if (stream && stream.readyState === 1) { channel.postMessage("open"); }
    } else if (what === "open") {
      opened();
    } else if (what === "error") {
      lost();
    } else if (what === "change") {
      refresh();
    }
  };
  navigator.locks.request(name, function () {
    listen(function (what) { channel.postMessage(what); });
    return new Promise(function () {});  // held until this tab closes
  });
  channel.postMessage("hello");
})();
