/*
 * pdseg-qupath: export each image's annotations as GeoJSON, for training without paquo.
 *
 * Writes <project>/pdseg/annotations/<image name>.geojson (a FeatureCollection, as QuPath writes it).
 * In the file name, each of  / \ : * ? " < > |  in the image name becomes _  (the same rule as
 * pdseg_qupath.core.names.safe_filename).
 *
 * QuPath 0.5 and 0.6 (checked with QuPath 0.6.0 and its bundled Java 21).
 *
 * In QuPath: open the project, then Automate > Script editor, open this file and choose
 *   Run > Run for project   (all images; select them all in the dialog), or
 *   Run                     (with no image open: all images; with an image open: that image only).
 *
 * Headless (the script runs once per image of the project; nothing is modified, so no --save):
 *   QuPath script -p /path/to/project.qpproj export_annotations.groovy
 * (on Windows use QuPath-0.6.x (console).exe; on macOS QuPath.app/Contents/MacOS/QuPath)
 * Headless runs stop at the first image whose image file is missing (QuPath's own behaviour, before this
 * script runs): fix its path first (Update URIs), or run the script in the GUI.
 *
 * Afterwards train with the slides and this folder, e.g.
 *   pdseg-qupath train <folder with the slides and the .geojson files> ...
 */

import qupath.lib.io.PathIO

def pdsegFileName(String imageName) {
    // Same characters as pdseg_qupath.core.names.UNSAFE_CHARS; the regex is  [/\\:*?"<>|]
    return imageName.replaceAll('[/\\\\:*?"<>|]', '_') + '.geojson'
}

def exportOne(entry, hierarchy, File outDir) {
    def annotations = hierarchy.getAnnotationObjects()
    def file = new File(outDir, pdsegFileName(entry.getImageName()))
    exportObjectsToGeoJson(annotations, file.getAbsolutePath(), "FEATURE_COLLECTION")
    println "pdseg: ${annotations.size()} annotations of '${entry.getImageName()}' -> ${file}"
}

def project = getProject()
if (project == null) {
    println "pdseg: no project is open. Open a QuPath project (or pass -p project.qpproj) and run again."
    return
}
def outDir = new File(project.getPath().getParent().toFile(), "pdseg" + File.separator + "annotations")
outDir.mkdirs()

def current = getCurrentImageData()
def currentEntry = current == null ? null : getProjectEntry()
if (current != null && currentEntry != null) {
    // Run for project / headless batch: called once per image with that image current.
    exportOne(currentEntry, current.getHierarchy(), outDir)
} else {
    // Plain Run without an open image: every image. readHierarchy() needs only the data file,
    // so images whose slide file moved are exported too.
    for (entry in project.getImageList()) {
        try {
            exportOne(entry, entry.readHierarchy(), outDir)
        } catch (Exception e) {
            println "pdseg: could not export '${entry.getImageName()}': ${e.getMessage()}"
        }
    }
}
