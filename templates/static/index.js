// Client-side filter and pagination for the index. Every row is in the HTML, so the
// page works without JavaScript; this only hides rows.
(function () {
  "use strict";
  var PAGE_SIZE = 50;
  var table = document.getElementById("lens-list");
  var bar = document.getElementById("filter-bar");
  if (!table || !bar) return;

  var rows = Array.prototype.slice.call(table.tBodies[0].rows);
  var search = document.getElementById("search");
  var count = document.getElementById("match-count");
  var info = document.getElementById("page-info");
  var prev = document.getElementById("prev-page");
  var next = document.getElementById("next-page");
  var matches = rows;
  var page = 0;

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
  }

  function applyFilter() {
    var terms = search.value.toLowerCase().split(/\s+/).filter(Boolean);
    matches = rows.filter(function (row) {
      var text = row.getAttribute("data-search") || "";
      return terms.every(function (term) { return text.indexOf(term) !== -1; });
    });
    page = 0;
    render();
  }

  search.addEventListener("input", applyFilter);
  prev.addEventListener("click", function () { page -= 1; render(); });
  next.addEventListener("click", function () { page += 1; render(); });
  bar.hidden = false;
  applyFilter();
})();
