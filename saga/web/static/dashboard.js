// saga dashboard: live refresh. Hand-written, no build step, no dependencies.
//
// The page listens to the dashboard's server-sent events (/events). The server tells it
// when something changed in the database (it LISTENs and watches the history; browsers
// never poll the database); the page then fetches its own URL again and swaps the main
// content. While a form field has focus (somebody is typing), the refresh waits.
(function () {
  "use strict";
  var body = document.body;
  var url = body.getAttribute("data-events");
  var live = document.querySelector("[data-testid=live-status]");
  // Pages answering a form (a confirmation, a refusal) have no URL to fetch again.
  if (!url || !window.EventSource || body.hasAttribute("data-static")) { return; }

  var pending = false;
  var busy = false;

  function typing() {
    var el = document.activeElement;
    if (!el) { return false; }
    var tag = el.tagName;
    return tag === "INPUT" || tag === "TEXTAREA" || tag === "SELECT";
  }

  function refresh() {
    if (busy) { pending = true; return; }
    if (typing()) { pending = true; return; }
    pending = false;
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

  document.addEventListener("focusout", function () {
    window.setTimeout(function () { if (pending && !typing()) { refresh(); } }, 100);
  });

  var source = new EventSource(url);
  // Whatever changed between the page's render and its stream's start (or during a
  // reconnection) was announced to nobody: fetch the page once the stream is open.
  source.addEventListener("open", function () {
    if (live) { live.classList.add("on"); }
    refresh();
  });
  source.addEventListener("error", function () { if (live) { live.classList.remove("on"); } });
  source.addEventListener("change", refresh);
})();
