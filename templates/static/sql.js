// SQL console (sql.html): DuckDB-WASM over the site's Parquet files, each table a view (report/pages/sql.py).
//
// A classic script (so it runs, and explains itself, on file:// too) that imports the
// vendored DuckDB-WASM module only on this page and only over http(s). Every string from
// the database reaches the page through textContent, never as HTML.
(function () {
  "use strict";

  var root = document.getElementById("sql-console");
  if (!root || root.dataset.enabled !== "1") return;
  if (location.protocol === "file:") {
    document.getElementById("sql-file-notice").hidden = false;
    root.hidden = true;
    document.querySelectorAll(".sql-example").forEach(function (b) { b.disabled = true; });
    return;
  }

  var CATALOG = "results";
  var editor = document.getElementById("sql-editor");
  var runButton = document.getElementById("sql-run");
  var csvButton = document.getElementById("sql-csv");
  var limitInput = document.getElementById("sql-limit");
  var statusLine = document.getElementById("sql-status");
  var summary = document.getElementById("sql-summary");
  var errorBox = document.getElementById("sql-error");
  var resultWrap = document.getElementById("sql-result-wrap");
  var resultTable = document.getElementById("sql-result");
  var examples = document.querySelectorAll(".sql-example");

  function url(attr) { return new URL(root.dataset[attr], document.baseURI).href; }

  function setStatus(text) { statusLine.textContent = text; }

  function showError(message) {
    errorBox.textContent = message;
    errorBox.hidden = false;
  }

  function formatBytes(n) {
    return n >= 1e6 ? (n / 1e6).toFixed(1) + " MB" : n >= 1e3 ? (n / 1e3).toFixed(0) + " KB" : n + " B";
  }

  var ready = null;
  function open() {
    if (ready) return ready;
    ready = (async function () {
      setStatus("Starting DuckDB-WASM " + root.dataset.version + "\u2026");
      var duckdb = await import(url("module"));
      var worker = new Worker(url("worker"));
      var db = new duckdb.AsyncDuckDB(new duckdb.VoidLogger(), worker);
      await db.instantiate(url("wasm"), null);
      await db.open({ path: ":memory:", query: { castDecimalToDouble: true } });
      // Every Parquet file by its site path (what the views name), read over HTTP range
      // requests: only the footers and the row groups a query needs move.
      var spec = JSON.parse(document.getElementById("sql-views").textContent);
      var http = duckdb.DuckDBDataProtocol.HTTP;
      for (var i = 0; i < spec.files.length; i++) {
        await db.registerFileURL(spec.files[i], new URL(spec.files[i], document.baseURI).href, http, false);
      }
      var conn = await db.connect();
      // DuckDB 0.9 reads Parquet itself; never download an extension (nothing leaves this site).
      try { await conn.query("SET autoinstall_known_extensions = false"); } catch (e) { /* older DuckDB */ }
      try { await conn.query("SET autoload_known_extensions = false"); } catch (e) { /* older DuckDB */ }
      await conn.query("ATTACH ':memory:' AS " + CATALOG);
      await conn.query("USE " + CATALOG);
      for (var v = 0; v < spec.views.length; v++) {
        setStatus("Creating the views: " + (v + 1) + " of " + spec.views.length + "\u2026");
        await conn.query(spec.views[v].sql);
      }
      var version = (await conn.query("SELECT version() AS v")).getChild("v").get(0);
      setStatus("Ready: DuckDB " + version + " (WebAssembly); " + spec.views.length + " tables and views over " +
        spec.files.length + " Parquet files in the catalog \u201c" + CATALOG + "\u201d, read in parts over " +
        "HTTP range requests. What you create lives in this tab only.");
      return conn;
    })();
    ready.catch(function (error) {
      setStatus("The SQL console could not start.");
      showError(String(error && error.message || error));
    });
    return ready;
  }

  // --- values as text -------------------------------------------------------------
  function jsonReplacer(key, value) { return typeof value === "bigint" ? value.toString() : value; }

  function cellText(value, typeName) {
    if (value === null || value === undefined) return null;
    if (typeof value === "bigint") return value.toString();
    if (typeof value === "number") {
      if (/^Timestamp/.test(typeName)) return new Date(value).toISOString().replace("T", " ").replace(/\.000Z$|Z$/, "");
      if (/^Date/.test(typeName)) return new Date(value).toISOString().slice(0, 10);
      // FLOAT (float32) columns: the digits float32 holds, not its float64 expansion.
      if (/^Float(16|32)/.test(typeName)) return String(Number(value.toPrecision(7)));
      return String(value);
    }
    if (typeof value === "string") return value;
    if (typeof value === "boolean") return value ? "true" : "false";
    if (value instanceof Date) return value.toISOString();
    if (value instanceof Uint8Array) return "<" + value.length + " bytes>";
    if (typeof value.toJSON === "function") return JSON.stringify(value.toJSON(), jsonReplacer);
    if (typeof value.toArray === "function") return JSON.stringify(Array.from(value.toArray()), jsonReplacer);
    return JSON.stringify(value, jsonReplacer);
  }

  function isNumeric(typeName) { return /^(Int|Uint|Float|Decimal)/.test(typeName); }

  // --- running a query ------------------------------------------------------------
  var current = null;  // { columns, numeric, rows } of the last result, for the CSV

  async function run() {
    var sql = editor.value;
    if (!sql.trim()) return;
    var limit = Math.max(1, Math.min(1000000, Math.floor(Number(limitInput.value)) || 1000));
    limitInput.value = String(limit);
    errorBox.hidden = true;
    runButton.disabled = true;
    csvButton.disabled = true;
    summary.textContent = "Running\u2026";
    try {
      history.replaceState(null, "", "#q=" + encodeURIComponent(sql));
    } catch (e) { /* some embedders forbid it */ }
    var started = performance.now();
    try {
      var conn = await open();
      var reader = await conn.send(sql, true);
      var batches = [], count = 0, more = false;
      for await (var batch of reader) {
        batches.push(batch);
        count += batch.numRows;
        if (count > limit) { more = true; break; }
      }
      if (more) { try { await conn.cancelSent(); } catch (e) { /* finished meanwhile */ } }
      var schema = reader.schema || (batches[0] && batches[0].schema);
      var fields = schema ? schema.fields : [];
      var columns = fields.map(function (f) { return f.name; });
      var types = fields.map(function (f) { return String(f.type); });
      var rows = [];
      for (var b = 0; b < batches.length && rows.length < limit; b++) {
        var cols = fields.map(function (_, i) { return batches[b].getChildAt(i); });
        for (var r = 0; r < batches[b].numRows && rows.length < limit; r++) {
          rows.push(cols.map(function (col, i) { return cellText(col ? col.get(r) : null, types[i]); }));
        }
      }
      current = { columns: columns, numeric: types.map(isNumeric), rows: rows };
      render(current);
      var ms = Math.round(performance.now() - started);
      summary.textContent = (more ? "First " + rows.length + " rows shown (the result has more; raise the row limit)"
        : rows.length + (rows.length === 1 ? " row" : " rows")) + " \u00b7 " + ms + " ms";
      csvButton.disabled = columns.length === 0;
    } catch (error) {
      current = null;
      resultWrap.hidden = true;
      summary.textContent = "";
      showError(String(error && error.message || error));
    } finally {
      runButton.disabled = false;
    }
  }

  function render(result) {
    var thead = resultTable.tHead, tbody = resultTable.tBodies[0];
    thead.replaceChildren();
    tbody.replaceChildren();
    var head = document.createElement("tr");
    result.columns.forEach(function (name, i) {
      var th = document.createElement("th");
      th.scope = "col";
      th.textContent = name;
      if (result.numeric[i]) th.className = "num";
      head.appendChild(th);
    });
    thead.appendChild(head);
    var fragment = document.createDocumentFragment();
    result.rows.forEach(function (row) {
      var tr = document.createElement("tr");
      row.forEach(function (value, i) {
        var td = document.createElement("td");
        if (value === null) {
          td.className = "null";
          td.textContent = "NULL";
        } else {
          td.textContent = value;
          td.title = value.length > 60 ? value : "";
          if (result.numeric[i]) td.className = "num";
        }
        tr.appendChild(td);
      });
      fragment.appendChild(tr);
    });
    tbody.appendChild(fragment);
    resultWrap.hidden = result.columns.length === 0;
  }

  // --- CSV (RFC 4180; NULL is an empty field) -------------------------------------------
  function csvField(value) {
    if (value === null) return "";
    return /[",\r\n]|^\s|\s$/.test(value) ? '"' + value.replace(/"/g, '""') + '"' : value;
  }

  function toCsv(result) {
    var lines = [result.columns.map(csvField).join(",")];
    result.rows.forEach(function (row) { lines.push(row.map(csvField).join(",")); });
    return lines.join("\r\n") + "\r\n";
  }

  csvButton.addEventListener("click", function () {
    if (!current) return;
    var blob = new Blob([toCsv(current)], { type: "text/csv;charset=utf-8" });
    var link = document.createElement("a");
    link.href = URL.createObjectURL(blob);
    link.download = "query.csv";
    document.body.appendChild(link);
    link.click();
    link.remove();
    setTimeout(function () { URL.revokeObjectURL(link.href); }, 10000);
  });

  // --- wiring -----------------------------------------------------------------------
  runButton.addEventListener("click", run);
  editor.addEventListener("keydown", function (event) {
    if ((event.ctrlKey || event.metaKey) && event.key === "Enter") {
      event.preventDefault();
      run();
    }
  });
  examples.forEach(function (button) {
    button.addEventListener("click", function () {
      editor.value = button.dataset.sql;
      run();
    });
  });

  var fromUrl = /^#q=/.test(location.hash) ? location.hash.slice(3) : null;
  if (fromUrl !== null) {
    try { editor.value = decodeURIComponent(fromUrl); } catch (e) { /* malformed: keep the default */ }
  }
  open().then(function () {
    runButton.disabled = false;
    root.dataset.ready = "1";
    if (fromUrl !== null) run();
  }, function () {
    root.dataset.ready = "error";
  });
})();
