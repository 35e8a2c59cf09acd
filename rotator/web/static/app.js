// The page's only script (the CSP allows no other): sorting, filtering and a refresh of the fleet
// that swaps in the server-rendered, escaped fragment without reloading the page.
"use strict";

(function () {
  const body = document.body;
  const view = { sort: null, dir: 1 };

  function rows() {
    return Array.from(document.querySelectorAll("#keys tbody tr[data-key]"));
  }

  function sortValue(row, field, numeric) {
    const value = row.dataset[field] || "";
    return numeric ? Number(value) : value.toLowerCase();
  }

  function applySort() {
    const tbody = document.querySelector("#keys tbody");
    if (!view.sort || !tbody) {
      return;
    }
    const button = document.querySelector('#keys button[data-sort="' + view.sort + '"]');
    const numeric = button !== null && button.dataset.type === "number";
    const sorted = rows().sort(function (a, b) {
      // Keys the policy leaves alone stay at the bottom whatever the order: nothing is due there.
      const outA = a.dataset.state === "out_of_scope";
      const outB = b.dataset.state === "out_of_scope";
      if (outA !== outB) {
        return outA ? 1 : -1;
      }
      const x = sortValue(a, view.sort, numeric);
      const y = sortValue(b, view.sort, numeric);
      return (x < y ? -1 : x > y ? 1 : 0) * view.dir;
    });
    tbody.replaceChildren.apply(tbody, sorted);
    document.querySelectorAll("#keys th").forEach(function (th) { th.removeAttribute("aria-sort"); });
    if (button !== null) {
      button.closest("th").setAttribute("aria-sort", view.dir > 0 ? "ascending" : "descending");
    }
  }

  function notFresh(row) {
    return (row.dataset.sinks || "").split(" ").some(function (s) { return s !== "" && s !== "fresh"; });
  }

  function failed(row) {
    return ["failed", "at_risk", "in_doubt", "busy"].indexOf(row.dataset.result) >= 0;
  }

  const shows = {
    all: function () { return true; },
    scope: function (row) { return row.dataset.state !== "out_of_scope"; },
    overdue: function (row) { return row.dataset.urgency === "overdue"; },
    soon: function (row) { return ["week", "warn"].indexOf(row.dataset.urgency) >= 0; },
    failed: failed,
    sinks: notFresh,
    attention: function (row) {
      return ["overdue", "week"].indexOf(row.dataset.urgency) >= 0 || failed(row) || notFresh(row)
        || row.dataset.flight !== "";
    },
  };

  function applyFilter() {
    const input = document.getElementById("filter");
    const select = document.getElementById("show");
    const text = input ? input.value.trim().toLowerCase() : "";
    const show = shows[select ? select.value : "all"] || shows.all;
    let shown = 0;
    const all = rows();
    all.forEach(function (row) {
      const haystack = [row.dataset.client, row.dataset.key, row.dataset.alias].join(" ").toLowerCase();
      const visible = haystack.indexOf(text) >= 0 && show(row);
      row.hidden = !visible;
      shown += visible ? 1 : 0;
    });
    const count = document.getElementById("count");
    if (count) {
      count.textContent = shown + " of " + all.length + " keys";
    }
  }

  function bindSorting() {
    document.querySelectorAll("#keys button[data-sort]").forEach(function (button) {
      button.addEventListener("click", function () {
        view.dir = view.sort === button.dataset.sort ? -view.dir : 1;
        view.sort = button.dataset.sort;
        applySort();
      });
    });
  }

  function say(text) {
    const where = document.getElementById("refresh-state");
    if (where) {
      where.textContent = text;
    }
  }

  let lastFleet = null;
  // One refresh at a time: when the server takes longer than the interval (a large fleet, a slow
  // key service), a tick that comes while the last refresh is in flight is skipped, so requests
  // never pile up behind a slow report.
  let inFlight = false;

  async function refresh() {
    const url = body.dataset.fragmentUrl;
    const current = document.getElementById("fleet");
    if (!url || !current || inFlight) {
      return;
    }
    inFlight = true;
    try {
      const response = await fetch(url, { credentials: "same-origin", cache: "no-store" });
      if (!response.ok) {
        say("refresh failed (" + response.status + ")");
        return;
      }
      const parsed = new DOMParser().parseFromString(await response.text(), "text/html");
      const fresh = parsed.getElementById("fleet");
      if (!fresh) {
        say("refresh failed");
        return;
      }
      const stamp = fresh.dataset.updated;
      const updated = document.getElementById("updated");
      if (updated) {
        updated.textContent = "as of " + stamp;
      }
      say("");
      // Only a change replaces the table: an unchanged one keeps the reader's selection and focus.
      fresh.removeAttribute("data-updated");
      if (fresh.outerHTML === lastFleet) {
        return;
      }
      lastFleet = fresh.outerHTML;
      fresh.setAttribute("data-updated", stamp);
      current.replaceWith(document.importNode(fresh, true));
      bindSorting();
      applySort();
      applyFilter();
    } catch (error) {
      say("refresh failed");
    } finally {
      inFlight = false;
    }
  }

  // The table as the server sent it (before any sorting here), so that the first refresh, like
  // every later one, replaces it only when it changed.
  function served(fleet) {
    const copy = fleet.cloneNode(true);
    copy.removeAttribute("data-updated");
    return new DOMParser().parseFromString(copy.outerHTML, "text/html").getElementById("fleet").outerHTML;
  }

  function start() {
    const fleet = document.getElementById("fleet");
    if (fleet) {
      lastFleet = served(fleet);
    }
    const input = document.getElementById("filter");
    const select = document.getElementById("show");
    if (input) {
      input.addEventListener("input", applyFilter);
    }
    if (select) {
      select.addEventListener("change", applyFilter);
    }
    bindSorting();
    applyFilter();
    const seconds = Number(body.dataset.refreshS);
    if (body.dataset.fragmentUrl && seconds > 0) {
      window.setInterval(refresh, seconds * 1000);
    }
  }

  start();
})();
