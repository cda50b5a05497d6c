// Drover console: progressive enhancement only; every page works without it.
"use strict";

// Actions ask before they act; confirmed forms carry confirmed=1 (without this script the
// server answers a confirmation page instead).
document.addEventListener("submit", (event) => {
  const form = event.target;
  const question = form.dataset.confirm;
  if (!question) return;
  if (!window.confirm(question)) {
    event.preventDefault();
    return;
  }
  if (!form.querySelector('input[name="confirmed"]')) {
    const confirmed = document.createElement("input");
    confirmed.type = "hidden";
    confirmed.name = "confirmed";
    confirmed.value = "1";
    form.appendChild(confirmed);
  }
});

// Live updates: the page's event stream says something changed; reload the page and swap its
// data-live regions (not one the user is typing in).
(() => {
  const url = document.body.dataset.live;
  if (!url || !window.EventSource) return;
  const status = document.getElementById("live-status");
  let timer = null;
  let busy = false;
  async function refresh() {
    timer = null;
    if (busy) { timer = setTimeout(refresh, 1000); return; }
    busy = true;
    try {
      // After an action the address is the form's; the page names where it reloads from.
      const marked = document.querySelector("[data-refresh]");
      const target = marked ? marked.dataset.refresh : location.href;
      const response = await fetch(target, { credentials: "same-origin" });
      if (!response.ok) return;
      const fresh = new DOMParser().parseFromString(await response.text(), "text/html");
      for (const region of document.querySelectorAll("[data-live][id]")) {
        const next = fresh.getElementById(region.id);
        if (next && !region.contains(document.activeElement)) region.innerHTML = next.innerHTML;
      }
      if (status) status.textContent = "Updated " + new Date().toLocaleTimeString();
    } finally {
      busy = false;
    }
  }
  const source = new EventSource(url);
  // Subscribed (or subscribed again): what changed between this page's rendering and now,
  // or while the stream was down, sent no event here; look once.
  source.addEventListener("open", () => {
    if (!timer) timer = setTimeout(refresh, 0);
  });
  source.addEventListener("change", () => {
    if (!timer) timer = setTimeout(refresh, 700);
  });
  source.addEventListener("error", () => {
    if (status) status.textContent = "Live updates paused; reconnecting…";
  });
})();
