# kvq's CMake package: find_package(kvq) gives the header-only target kvq::kvq.
# Installed by `cmake --install` and by `make install` as <prefix>/share/cmake/kvq/.
get_filename_component(_kvq_prefix "${CMAKE_CURRENT_LIST_DIR}/../../.." ABSOLUTE)
if(NOT TARGET kvq::kvq)
  add_library(kvq::kvq INTERFACE IMPORTED)
  set_target_properties(kvq::kvq PROPERTIES INTERFACE_INCLUDE_DIRECTORIES "${_kvq_prefix}/include")
  if(UNIX)
    set_property(TARGET kvq::kvq PROPERTY INTERFACE_LINK_LIBRARIES m)
  endif()
endif()
unset(_kvq_prefix)
