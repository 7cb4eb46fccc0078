// The only file that knows pybind11: argument checks, GIL release and exception mapping.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <memory>
#include <string>
#include <vector>

#include "errors.h"
#include "loader.h"

namespace py = pybind11;

namespace {

// Owns the core loader and the Python objects whose memory its slots point into; the core's
// threads are joined before the buffers go.
struct LoaderHandle {
  LoaderHandle() = default;
  LoaderHandle(const LoaderHandle&) = delete;
  LoaderHandle& operator=(const LoaderHandle&) = delete;
  // A lease may keep the core alive after the handle goes; its threads must not go on
  // filling slots in buffers freed with the handle. They never take the GIL: joining them
  // while holding it cannot deadlock.
  ~LoaderHandle() {
    if (core) core->close();
  }

  std::vector<py::object> buffers;
  std::shared_ptr<t2i::Loader> core;

  t2i::Loader& get() { return *share(); }

  // A reference for work done without the GIL, during which another thread may close the
  // handle and drop its own.
  std::shared_ptr<t2i::Loader> share() {
    if (!core) throw std::invalid_argument("the loader is closed");
    return core;
  }
};

// One filled slot lent to Python, exposed through the buffer protocol. Arrays made from it
// keep it alive; when the last goes, the slot returns to the ring. It holds the slot's memory
// and the core, so a batch outlives a closed loader.
struct Lease {
  Lease(std::shared_ptr<t2i::Loader> core, py::object buffer, int slot)
      : core(std::move(core)), buffer(std::move(buffer)), slot(slot),
        bytes(this->core->layout().bytes), data(this->core->slot_data(slot)) {}
  Lease(const Lease&) = delete;
  Lease& operator=(const Lease&) = delete;
  ~Lease() { core->release(slot); }

  std::shared_ptr<t2i::Loader> core;
  py::object buffer;
  int slot;
  size_t bytes;
  uint8_t* data;
};

std::vector<uint8_t> to_bytes(const py::bytes& b) {
  const std::string s = b;
  return std::vector<uint8_t>(s.begin(), s.end());
}

// A slot layout as Python sees it: {"fields": [(name, offset, dtype, shape)], "bytes": n},
// dtype "pixel" (the caller's pixel type, elem_bytes wide), "uint8" or "int64".
py::dict to_python(const t2i::SlotLayout& layout) {
  py::list fields;
  for (const t2i::SlotField& f : layout.fields) {
    const char* dtype = f.dtype == t2i::SlotDtype::kPixel   ? "pixel"
                        : f.dtype == t2i::SlotDtype::kInt64 ? "int64"
                                                            : "uint8";
    fields.append(py::make_tuple(f.name, f.offset, dtype, py::tuple(py::cast(f.shape))));
  }
  py::dict d;
  d["fields"] = fields;
  d["bytes"] = layout.bytes;
  return d;
}

t2i::CaptionFormat caption_format(const std::string& name) {
  if (name == "indices") return t2i::CaptionFormat::kIndices;
  if (name == "onehot") return t2i::CaptionFormat::kOnehot;
  if (name == "ids") return t2i::CaptionFormat::kIds;
  throw std::invalid_argument("caption_format must be 'indices', 'onehot' or 'ids', got '" +
                              name + "'");
}

void raise_as(const char* name, const char* message) {
  py::object cls = py::module_::import("t2i_fast.errors").attr(name);
  PyErr_SetString(cls.ptr(), message);
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "t2i-fast native core: the LMDB batch loader";

  py::register_exception_translator([](std::exception_ptr p) {
    try {
      if (p) std::rethrow_exception(p);
    } catch (const t2i::CorruptRecord& e) {
      raise_as("CorruptRecordError", e.what());
    } catch (const t2i::LmdbError& e) {
      raise_as("DataError", e.what());
    }
  });

  m.def(
      "slot_layout",
      [](int64_t batch_size, int size, int captions_per_sample, int doc_length,
         const std::string& captions, int elem_bytes, bool nhwc) {
        t2i::SlotGeometry g;
        g.batch_size = batch_size;
        g.size = size;
        g.captions_per_sample = captions_per_sample;
        g.doc_length = doc_length;
        g.captions = caption_format(captions);
        g.elem_bytes = elem_bytes;
        g.nhwc = nhwc;
        return to_python(t2i::slot_layout(g));
      },
      py::kw_only(), py::arg("batch_size"), py::arg("size"), py::arg("captions_per_sample"),
      py::arg("doc_length"), py::arg("caption_format"), py::arg("elem_bytes"), py::arg("nhwc"),
      "The layout of one batch slot, as the loader fills it: {'fields': [(name, byte offset, "
      "dtype, shape)], 'bytes': the slot's size}; dtype is 'pixel' (elem_bytes wide, the "
      "caller's pixel type), 'uint8' or 'int64'.");

  py::class_<LoaderHandle>(m, "Loader")
      .def(py::init([](const std::string& path, int64_t count, int64_t num_classes,
                       int image_height, int image_width, int doc_length,
                       const std::string& encoding, int64_t batch_size, int size,
                       int captions_per_sample, const std::string& captions, int elem_bytes,
                       py::bytes lut,
                       py::bytes one, bool nhwc, bool random_crop, bool flip, uint64_t seed,
                       int rank, int world_size, bool drop_last, int num_threads, bool verify) {
             if (encoding != "raw" && encoding != "jpeg")
               throw std::invalid_argument("encoding must be 'raw' or 'jpeg', got '" + encoding +
                                           "'");
             t2i::DatasetSpec spec;
             spec.count = count;
             spec.num_classes = num_classes;
             spec.height = image_height;
             spec.width = image_width;
             spec.doc_length = doc_length;
             spec.encoding = encoding == "raw" ? t2i::Encoding::kRaw : t2i::Encoding::kJpeg;
             t2i::check_spec(spec);
             t2i::LoaderOptions o;
             o.batch_size = batch_size;
             o.size = size;
             o.captions_per_sample = captions_per_sample;
             o.captions = caption_format(captions);
             o.elem_bytes = elem_bytes;
             o.lut = to_bytes(lut);
             o.one = to_bytes(one);
             o.nhwc = nhwc;
             o.random_crop = random_crop;
             o.flip = flip;
             o.seed = seed;
             o.rank = rank;
             o.world_size = world_size;
             o.drop_last = drop_last;
             o.num_threads = num_threads;
             o.verify = verify;
             auto handle = std::make_unique<LoaderHandle>();
             py::gil_scoped_release release;  // opening parses every record header
             handle->core = std::make_shared<t2i::Loader>(path, spec, std::move(o));
             return handle;
           }),
           py::arg("path"), py::kw_only(), py::arg("count"), py::arg("num_classes"),
           py::arg("image_height"), py::arg("image_width"), py::arg("doc_length"),
           py::arg("encoding"), py::arg("batch_size"),
           py::arg("size"), py::arg("captions_per_sample"), py::arg("caption_format"),
           py::arg("elem_bytes"), py::arg("lut"), py::arg("one"), py::arg("nhwc"),
           py::arg("random_crop"), py::arg("flip"), py::arg("seed"), py::arg("rank"),
           py::arg("world_size"), py::arg("drop_last"), py::arg("num_threads"),
           py::arg("verify"))
      .def_property_readonly("layout",
                             [](LoaderHandle& h) { return to_python(h.get().layout()); })
      .def_property_readonly("num_batches", [](LoaderHandle& h) { return h.get().num_batches(); })
      .def_property_readonly("num_captions",
                             [](LoaderHandle& h) { return h.get().num_captions(); })
      .def_property_readonly("num_slots", [](LoaderHandle& h) { return h.get().num_slots(); })
      .def_property_readonly("num_leased", [](LoaderHandle& h) { return h.get().num_leased(); })
      .def(
          "add_slot",
          [](LoaderHandle& h, py::buffer buffer) {
            py::buffer_info info = buffer.request(/*writable=*/true);
            const size_t need = h.get().layout().bytes;
            if (info.ndim != 1 || info.itemsize != 1 || info.strides[0] != 1)
              throw std::invalid_argument("buffer must be a contiguous 1-D byte buffer");
            if (size_t(info.size) < need)
              throw std::invalid_argument("buffer holds " + std::to_string(info.size) +
                                          " bytes, a slot needs " + std::to_string(need));
            const int slot = h.get().add_slot(static_cast<uint8_t*>(info.ptr));
            h.buffers.push_back(buffer);
            return slot;
          },
          py::arg("buffer"), "Adds a slot whose memory is `buffer` (kept alive by the loader).")
      .def(
          "start_epoch",
          [](LoaderHandle& h, uint64_t epoch, int64_t first_batch) {
            std::shared_ptr<t2i::Loader> core = h.share();
            py::gil_scoped_release release;
            core->start_epoch(epoch, first_batch);
          },
          py::arg("epoch"), py::arg("first_batch") = 0)
      .def(
          "next",
          [](LoaderHandle& h) -> py::object {
            std::shared_ptr<t2i::Loader> core = h.share();
            std::optional<t2i::ReadyBatch> ready;
            {
              py::gil_scoped_release release;
              ready = core->next();
            }
            if (!ready) return py::none();
            if (h.core != core) {  // closed by another thread while this one waited
              core->release(ready->slot);
              throw std::invalid_argument("the loader is closed");
            }
            auto lease = std::make_unique<Lease>(core, h.buffers[ready->slot], ready->slot);
            return py::make_tuple(py::cast(std::move(lease)), ready->batch, ready->size);
          },
          "(lease, batch, size) of the next full batch, or None at the end of the epoch; the "
          "lease exposes the slot's bytes and frees the slot when the last view of it goes.")
      .def("close", [](LoaderHandle& h) {
        // Its own reference: another thread's close() may reset h.core meanwhile.
        std::shared_ptr<t2i::Loader> core = h.core;
        if (!core) return;
        {
          py::gil_scoped_release release;
          core->close();
        }
        h.core.reset();
        // The buffers leave the handle before any is released: releasing one may run Python
        // code that hands the GIL to another closing thread, which must find none left.
        std::vector<py::object> buffers;
        buffers.swap(h.buffers);
      });

  py::class_<Lease>(m, "Lease", py::buffer_protocol())
      .def_buffer([](Lease& l) {
        return py::buffer_info(l.data, 1, py::format_descriptor<uint8_t>::format(), 1,
                               {py::ssize_t(l.bytes)}, {py::ssize_t(1)});
      })
      .def_readonly("slot", &Lease::slot);

}
