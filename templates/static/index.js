// The index's table of lens pages: per-column filters (image id exact; file name,
// category and predicted token contain; model and run chosen), an any-column filter (each
// word must match within one column), sorting by any column (file names and ids in
// natural order: img2 before img10), and pagination; all of it kept in the URL
// (index.html#file=..&sort=file&dir=desc&page=2). Every row is in the HTML, so the page
// works without JavaScript; this only orders and hides rows.
(function () {
  "use strict";
  var PAGE_SIZE = 50;
  var table = document.getElementById("lens-list");
  var bar = document.getElementById("filter-bar");
  if (!table || !bar) return;

  var tbody = table.tBodies[0];
  var rows = Array.prototype.slice.call(tbody.rows);
  var original = rows.slice(); // the build's order: natural file-name order
  function byId(id) { return document.getElementById(id); }
  var search = byId("search");
  var count = byId("match-count");
  var info = byId("page-info");
  var prev = byId("prev-page");
  var next = byId("next-page");
  var filterRow = byId("column-filters");
  var filters = {
    id: byId("filter-image"), file: byId("filter-file"), cat: byId("filter-category"),
    model: byId("filter-model"), run: byId("filter-run"), next: byId("filter-next"),
  };
  var FIELDS = ["image", "file", "categories", "model", "run", "next"];
  var NUMERIC = { image: true, positions: true, layers: true, prob: true };
  var sortKey = "file";
  var sortDir = 1;
  var matches = rows;
  var page = 0;
  var applying = false;

  function field(row, name) { return row.getAttribute("data-" + name) || ""; }

  // Natural comparison: digit runs compare by value.
  var collator = typeof Intl !== "undefined" && Intl.Collator ? new Intl.Collator(undefined, { numeric: true, sensitivity: "base" }) : null;
  function compareText(a, b) { return collator ? collator.compare(a, b) : (a < b ? -1 : a > b ? 1 : 0); }

  function compare(a, b) {
    var x = field(a, sortKey), y = field(b, sortKey), d;
    if (NUMERIC[sortKey]) d = (parseFloat(x) || 0) - (parseFloat(y) || 0);
    else d = compareText(x, y);
    if (d === 0) return original.indexOf(a) - original.indexOf(b);
    return sortDir * d;
  }

  function render() {
    var pages = Math.max(1, Math.ceil(matches.length / PAGE_SIZE));
    page = Math.min(Math.max(page, 0), pages - 1);
    var first = page * PAGE_SIZE;
    var visible = new Set(matches.slice(first, first + PAGE_SIZE));
    rows.forEach(function (row) { row.hidden = !visible.has(row); });
    count.textContent = matches.length + " of " + rows.length + " images";
    info.textContent = "page " + (page + 1) + " of " + pages;
    prev.disabled = page === 0;
    next.disabled = page >= pages - 1;
    Array.prototype.forEach.call(table.querySelectorAll("button.sort"), function (button) {
      var th = button.parentNode;
      th.setAttribute("aria-sort", button.getAttribute("data-sort") !== sortKey ? "none" : sortDir > 0 ? "ascending" : "descending");
    });
    writeUrl();
  }

  function applyFilter(keepPage) {
    var terms = search.value.toLowerCase().split(/\s+/).filter(Boolean);
    var id = filters.id ? filters.id.value.trim() : "";
    var file = filters.file ? filters.file.value.trim().toLowerCase() : "";
    var cat = filters.cat ? filters.cat.value.trim().toLowerCase() : "";
    var model = filters.model ? filters.model.value : "";
    var run = filters.run ? filters.run.value : "";
    var nextToken = filters.next ? filters.next.value.trim().toLowerCase() : "";
    matches = rows.filter(function (row) {
      if (id && field(row, "image") !== id) return false;
      if (file && field(row, "file").toLowerCase().indexOf(file) === -1) return false;
      if (cat && field(row, "categories").toLowerCase().indexOf(cat) === -1) return false;
      if (model && field(row, "model") !== model) return false;
      if (run && field(row, "run") !== run) return false;
      if (nextToken && field(row, "next").toLowerCase().indexOf(nextToken) === -1) return false;
      return terms.every(function (term) {
        return FIELDS.some(function (name) { return field(row, name).toLowerCase().indexOf(term) !== -1; });
      });
    });
    if (!keepPage) page = 0;
    render();
  }

  function sortRows() {
    rows.sort(compare);
    var fragment = document.createDocumentFragment();
    rows.forEach(function (row) { fragment.appendChild(row); });
    tbody.appendChild(fragment);
    matches.sort(compare);
  }

  // --- URL state: #q=&id=&file=&cat=&model=&run=&next=&sort=&dir=&page= -------------------
  function writeUrl() {
    if (applying) return;
    var params = new URLSearchParams();
    if (search.value) params.set("q", search.value);
    Object.keys(filters).forEach(function (key) { if (filters[key] && filters[key].value) params.set(key, filters[key].value); });
    if (sortKey !== "file" || sortDir !== 1) { params.set("sort", sortKey); params.set("dir", sortDir > 0 ? "asc" : "desc"); }
    if (page > 0) params.set("page", String(page + 1));
    var hash = params.toString() ? "#" + params.toString() : "";
    if (window.location.hash !== hash && window.history && window.history.replaceState) {
      try { window.history.replaceState(null, "", hash || window.location.pathname); } catch (e) { /* file:// */ }
    }
  }

  function readUrl() {
    var params = new URLSearchParams(window.location.hash.replace(/^#/, ""));
    applying = true;
    search.value = params.get("q") || "";
    Object.keys(filters).forEach(function (key) { if (filters[key]) filters[key].value = params.get(key) || ""; });
    var key = params.get("sort");
    var known = Array.prototype.some.call(table.querySelectorAll("button.sort"), function (b) { return b.getAttribute("data-sort") === key; });
    sortKey = known ? key : "file";
    sortDir = params.get("dir") === "desc" ? -1 : 1;
    sortRows();
    applyFilter(false);
    var wanted = parseInt(params.get("page"), 10);
    page = isNaN(wanted) ? 0 : wanted - 1;
    applying = false;
    render();
  }

  search.addEventListener("input", function () { applyFilter(false); });
  Object.keys(filters).forEach(function (key) {
    var el = filters[key];
    if (el) el.addEventListener(el.tagName === "SELECT" ? "change" : "input", function () { applyFilter(false); });
  });
  Array.prototype.forEach.call(table.querySelectorAll("button.sort"), function (button) {
    button.addEventListener("click", function () {
      var key = button.getAttribute("data-sort");
      sortDir = key === sortKey ? -sortDir : 1;
      sortKey = key;
      sortRows();
      render();
    });
  });
  prev.addEventListener("click", function () { page -= 1; render(); });
  next.addEventListener("click", function () { page += 1; render(); });
  window.addEventListener("hashchange", readUrl);
  bar.hidden = false;
  if (filterRow) filterRow.hidden = false;
  readUrl();
})();
