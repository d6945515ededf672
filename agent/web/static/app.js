// Live updates for the doorbell app: no inline script (the CSP forbids it), no dependencies.
// The server pushes an event whenever a request arrives or changes; the requests page then
// fetches its list again as server-rendered (escaped) HTML, so no markup is built from data here.
"use strict";

// Cancel on a confirm step closes it: no decision is made (without script, its link reloads
// the page, which closes it too).
document.addEventListener("click", function (event) {
  const cancel = event.target instanceof Element && event.target.closest("[data-action=cancel]");
  const step = cancel && cancel.closest("details");
  if (step) {
    event.preventDefault();
    step.open = false;
  }
});

(function () {
  const badge = document.getElementById("pending-badge");
  if (!badge || !window.EventSource) {
    return; // not logged in, or a browser without server-sent events
  }
  const live = document.getElementById("requests-live");
  let refreshing = false;

  function showCount(pending) {
    badge.textContent = String(pending);
    badge.hidden = pending === 0;
  }

  async function refresh(fingerprint) {
    if (!live || refreshing || live.dataset.fingerprint === fingerprint) {
      return;
    }
    refreshing = true;
    try {
      const response = await fetch("/requests/fragment", {
        credentials: "same-origin",
        headers: { Accept: "text/html" },
      });
      if (response.redirected || response.status === 401) {
        window.location.assign("/login");
        return;
      }
      if (response.ok) {
        live.innerHTML = await response.text();
        live.dataset.fingerprint = fingerprint;
      }
    } finally {
      refreshing = false;
    }
  }

  const events = new EventSource("/api/events");
  events.addEventListener("requests", function (event) {
    const data = JSON.parse(event.data);
    showCount(data.pending);
    refresh(data.fingerprint);
  });
  events.addEventListener("logout", function () {
    events.close();
    window.location.assign("/login");
  });
})();
