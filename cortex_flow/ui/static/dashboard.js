// cortex-flow dashboard: swap in fresh sections from server-sent events; post DLQ actions.
"use strict";
(function () {
  function csrf() {
    var meta = document.querySelector('meta[name="csrf-token"]');
    return meta ? meta.content : "";
  }

  function apply(sections) {
    Object.keys(sections).forEach(function (id) {
      var el = document.getElementById(id);
      if (!el) return;
      // keep open <details> (a dead letter being read) open across refreshes
      var open = Array.prototype.map.call(el.querySelectorAll("details[open] code"), function (c) {
        return c.textContent;
      });
      el.innerHTML = sections[id];
      el.querySelectorAll("details").forEach(function (d) {
        var code = d.querySelector("code");
        if (code && open.indexOf(code.textContent) >= 0) d.open = true;
      });
    });
    document.body.dataset.updated = String(Date.now());
  }

  function live() {
    var state = document.getElementById("live");
    if (!state || !window.EventSource) return;
    var source = new EventSource("/ui/events" + window.location.search);
    source.onopen = function () { state.textContent = "live"; state.className = "live on"; };
    source.onerror = function () { state.textContent = "reconnecting…"; state.className = "live off"; };
    source.onmessage = function (event) { apply(JSON.parse(event.data)); };
  }

  function post(url, body) {
    return fetch(url, {
      method: "POST",
      credentials: "same-origin",
      headers: { "Content-Type": "application/json", "X-CSRF-Token": csrf() },
      body: JSON.stringify(body),
    }).then(function (r) {
      return r.json().then(function (data) { return { ok: r.ok, data: data }; });
    });
  }

  document.addEventListener("click", function (event) {
    var button = event.target.closest("button[data-action]");
    if (!button) return;
    if (button.dataset.confirm && !window.confirm(button.dataset.confirm)) return;
    var result = document.getElementById("dlq-result");
    button.disabled = true;
    post("/ui/dlq/" + button.dataset.action, { key: button.dataset.key, ids: [button.dataset.id] })
      .then(function (r) {
        result.textContent = r.ok
          ? r.data.action + ": " + r.data.done + " done"
          : "refused: " + (r.data.error || "error") + (r.data.fix ? " (" + r.data.fix + ")" : "");
        return fetch("/ui/sections" + window.location.search, { credentials: "same-origin" });
      })
      .then(function (r) { return r.json(); })
      .then(apply)
      .catch(function (e) { result.textContent = "failed: " + e; });
  });

  var login = document.getElementById("login");
  if (login) {
    login.addEventListener("submit", function (event) {
      event.preventDefault();
      post("/ui/login", { token: login.elements.token.value }).then(function (r) {
        if (r.ok) window.location.href = "/ui";
        else document.getElementById("login-error").textContent = r.data.error || "refused";
      });
    });
  } else {
    live();
  }
})();
